"""The default corpus: the Python standard library's source of the running interpreter.

A real code corpus present wherever Python is, with no network. It holds every ``.py``
file under ``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order, except
``site-packages`` (third-party code, different on every machine), ``__pycache__``, hidden
directories and ``_sysconfigdata*`` (the build configuration of this one machine). The
standard library's own test suites (``test/``, ``*/tests/``) are kept: they are real code
and more than half of the text; distributions that strip them give a smaller corpus and
a different cache key. Identical files are deduplicated and the train/validation split is
by a hash of the relative path, both in ``looplm.data.corpus``.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
from pathlib import Path

from looplm.data.sources import FileEntry, FileSource

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[Path, str]]:
    """``(path, relative posix path)`` of the corpus files, sorted by relative path."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = Path(dirpath) / name
                out.append((path, path.relative_to(root).as_posix()))
    return sorted(out, key=lambda pair: pair[1])


def stdlib_source(max_files: int | None = None, root: Path | None = None) -> FileSource:
    """The corpus as a ``FileSource`` (the first ``max_files`` files when given, for tests).
    Its label and fingerprint carry the interpreter version."""
    files = stdlib_files(root)[:max_files]
    version = f"{platform.python_implementation()}-{platform.python_version()}"
    label = f"stdlib-{version}"
    return FileSource([FileEntry(p, key, explicit=False) for p, key in files], label=label, salt=sys.version)
