"""User-facing errors: one clear message naming the fix, no traceback in the CLI."""


class LoopLMError(Exception):
    """An error the user can cause and fix (bad config, missing file, wrong checkpoint...).

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    Library callers get an ordinary exception; subclasses also derive from the builtin
    they refine (ValueError, FileNotFoundError) so generic handlers keep working.
    """


class ConfigError(LoopLMError, ValueError):
    """An invalid configuration value or an unknown configuration key."""


class CheckpointError(LoopLMError, ValueError):
    """A checkpoint that is missing, unreadable, or does not match its config."""


class DataError(LoopLMError, ValueError):
    """Input data that cannot be used (missing path, empty corpus, bad format)."""


class ConversionError(LoopLMError, ValueError):
    """A pretrained model that cannot be imported or exported (unsupported architecture or tensor
    type, truncated file, missing tensors, mismatched tokenizer)."""
