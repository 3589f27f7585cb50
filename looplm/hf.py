"""transformers integration: LoopLM as a ``PreTrainedModel`` registered with the Auto classes.

After ``import looplm.hf``, ``AutoModelForCausalLM.from_pretrained(dir)`` loads a looplm
checkpoint directory (``config.json`` with ``"model_type": "looplm"`` + ``model.safetensors``
as written by ``looplm.checkpoint.save_model``) and ``generate()`` works with it.

LoopLM's decoding state (fixed-size mixer states, per-recursion KV caches, per-row positions) is
not a list of per-layer keys/values, so it travels through ``past_key_values`` inside
:class:`LoopLMCache`, a ``Cache`` subclass that only holds the ``ModelState``: prefill and
each decoding step are one LoopLM forward that reads and returns the state, exactly as in
``looplm.generate``. Beam search (which reorders caches) is not supported.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from looplm.checkpoint import HF_RENAMED
from looplm.generate import decoding_mode
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import apply_structure
from looplm.state import ModelState

# transformers renamed ``past_key_values`` to ``cache`` (inputs and outputs) in 5.2x; both are taken.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

# LoopConfig's ``top_k`` (experts per token) would clash with the sampling parameter of the same
# name that transformers refuses in a model config; it is stored as ``moe_top_k`` here. Likewise
# ``rope_scaling``, which transformers 5 rewrites into its own ``rope_parameters``.
_RENAMED = HF_RENAMED

# save_pretrained writes this module next to the weights and names it in config.json's auto_map, so
# plain transformers (``trust_remote_code=True``) finds these classes in the installed looplm.
AUTO_MODULE = "looplm_auto"
AUTO_SOURCE = ('"""transformers\' remote-code entry: the classes of the installed looplm."""\n'
               "from looplm.hf import LoopLMForCausalLM, LoopLMHFConfig\n\n"
               '__all__ = ["LoopLMForCausalLM", "LoopLMHFConfig"]\n')
AUTO_MAP = {"AutoConfig": f"{AUTO_MODULE}.LoopLMHFConfig",
            "AutoModelForCausalLM": f"{AUTO_MODULE}.LoopLMForCausalLM"}


class LoopLMHFConfig(PreTrainedConfig):
    """transformers config holding every LoopConfig field as an attribute (``top_k`` as
    ``moe_top_k``; a looplm ``config.json`` with ``top_k`` is read too)."""

    model_type = "looplm"

    def __post_init__(self, **kwargs: Any) -> None:
        for old, new in _RENAMED.items():
            if old in kwargs:
                kwargs.setdefault(new, kwargs.pop(old))
        defaults = LoopConfig().to_dict()
        loop = {_RENAMED.get(k, k): kwargs.pop(_RENAMED.get(k, k), v) for k, v in defaults.items()}
        kwargs["tie_word_embeddings"] = False  # LoopLM ties inside itself (no separate head weight)
        super().__post_init__(**kwargs)
        for key, value in loop.items():
            setattr(self, key, value)

    @classmethod
    def from_loop_config(cls, config: LoopConfig, **kwargs: Any) -> LoopLMHFConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_loop_config(self) -> LoopConfig:
        """The LoopConfig these attributes describe (validated; ConfigError if invalid)."""
        return LoopConfig.from_dict({f.name: getattr(self, _RENAMED.get(f.name, f.name))
                                     for f in fields(LoopConfig)})


class LoopLMCache(Cache):
    """``past_key_values`` of a LoopLM: wraps the ``ModelState`` a forward returned."""

    def __init__(self, state: ModelState) -> None:
        super().__init__(layers=[])
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by the longest row (pads excluded)."""
        return int(self.state.positions.max()) if self.state.batch_size else 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("LoopLMCache cannot reorder or crop its state: use greedy or sampling, "
                                  "not beam search or assisted decoding")

    reorder_cache = batch_select_indices = batch_repeat_interleave = crop = _unsupported


class LoopLMForCausalLM(PreTrainedModel, GenerationMixin):
    """LoopLM under transformers' causal-LM interface; ``self.model`` is the LoopLM."""

    config_class = LoopLMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Layer"]

    def __init__(self, config: LoopLMHFConfig) -> None:
        super().__init__(config)
        self.model = LoopLM(config.to_loop_config())
        section = getattr(config, "quantization", None)
        if section:  # a quantised checkpoint: swap in its QuantLinear modules before loading
            apply_structure(self.model, section)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> LoopLMForCausalLM:
        """transformers' loader, then two fixes: non-persistent buffers (constants a layer
        computes in its constructor, e.g. retention decays) are not in the weights file and
        transformers leaves them uninitialised, so they are copied from a freshly built LoopLM;
        a generation config derived from a looplm ``config.json`` drops ``top_k``, which there
        counts experts, not sampling candidates."""
        model = super().from_pretrained(*args, **kwargs)
        stored = model.model.state_dict().keys()
        fresh = dict(LoopLM(model.model.config).named_buffers())
        with torch.no_grad():
            for name, buffer in model.model.named_buffers():
                if name not in stored:
                    buffer.copy_(fresh[name])
        if getattr(model.generation_config, "_from_model_config", False):
            model.generation_config.top_k = None
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its own LoopLMCache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """LoopLM initialises its own weights in its constructor; nothing to add here."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: LoopLMCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, cache: LoopLMCache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids ``[B, T]``; attention_mask ``[B, S]`` (S ≥ T, its last T columns describe
        input_ids; 0 = padding); labels ``[B, T]`` unshifted, as in transformers (−100 ignored);
        ``cache`` (transformers >= 5.2x) or ``past_key_values`` (before): a LoopLMCache."""
        T = input_ids.shape[1]
        given = cache if cache is not None else past_key_values
        state = given.state if isinstance(given, LoopLMCache) else None
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -T:].bool()
            mask = None if bool(mask.all()) else mask
        targets = None
        if labels is not None:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        out = self.model(input_ids, targets, state=state, mask=mask,
                         use_cache=bool(use_cache) or state is not None)
        new = LoopLMCache(out.state) if out.state is not None else None
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{_CACHE_FIELD: new})

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """transformers' save_pretrained, with ``auto_map`` in config.json and the module it names
        (:data:`AUTO_MODULE`), so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
        works without importing looplm first."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory, AUTO_MODULE + ".py").write_text(AUTO_SOURCE)
        return result

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` in ``looplm.generate.decoding_mode`` (eval, causal
        expert-choice routing), so its tokens match looplm's own generate."""
        with decoding_mode(self.model):
            return super().generate(*args, **kwargs)


AutoConfig.register("looplm", LoopLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopLMHFConfig, LoopLMForCausalLM, exist_ok=True)
