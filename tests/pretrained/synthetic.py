"""Small random Llama-family models written as a Hugging Face directory and as a GGUF file, for
the import tests (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from looplm.generate import generate_ids

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "def f(x):\n    return x * 2  # 1234567890\n"
) * 20


def tokenizer(vocab_size: int = 300):
    """A byte-level BPE (GPT-2 style) trained on a short text, specials at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def hf_config(vocab_size: int, arch: str = "llama", tied: bool = False, **extra):
    import transformers

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=2,
    )
    kw.update(extra)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[arch]
    return cls(**kw)


def hf_model(arch: str = "llama", tied: bool = False, seed: int = 0, vocab_size: int | None = None, **extra):
    """``(model, tokenizer)``: a random transformers model of ``arch`` and the test tokenizer."""
    import transformers

    tok = tokenizer()
    V = vocab_size or tok.get_vocab_size()
    torch.manual_seed(seed)
    config = hf_config(V, arch, tied, **extra)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[arch]
    model = cls(config).eval()
    with torch.no_grad():  # norms and biases away from their init, so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model, tok


def save_hf_dir(directory: Path, arch: str = "llama", tied: bool = False, **extra):
    """Write a Hugging Face directory (safetensors, tokenizer.json, chat template); returns the model."""
    from transformers import PreTrainedTokenizerFast

    model, tok = hf_model(arch, tied, **extra)
    model.save_pretrained(directory)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return model


def save_gguf(
    path: Path,
    model,
    tok,
    types: dict[str, str] | None = None,
    *,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
) -> None:
    """Write ``model`` (a transformers Llama) as llama.cpp's converter would: q/k rows permuted,
    names renamed; ``types`` maps a GGUF tensor name suffix (``attn_q``, ``token_embd``...) to a type
    name (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); 2-D tensors default to F32."""
    import gguf

    from looplm.pretrained.gguf_file import permute_qk

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    spec = __import__("json").loads(tok.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    types = types or {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if hf_name.startswith("model.layers."):
            _, _, i, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{names[module]}.{kind}"
            if module == "self_attn.q_proj":
                t = permute_qk(t, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                t = permute_qk(t, c.num_key_value_heads)
        else:
            name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[hf_name]
        if any(name.startswith(d) or f".{d}." in name for d in drop):
            continue
        data = t.detach().float().numpy()
        kind = (
            next((v for k, v in types.items() if f"{k}.weight" in name), "F32") if data.ndim == 2 else "F32"
        )
        add_tensor(w, name, data, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_tensor(writer, name: str, data: np.ndarray, kind: str) -> None:
    """``data`` stored as GGUF type ``kind`` (quantised with the gguf package)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def assert_parity(reference, model, rows: list[list[int]]) -> None:
    """Logits within 1e-3 on each prompt and 64 greedy tokens identical."""
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            ref, got = reference(ids).logits[0], model(ids).logits[0]
            assert (ref - got).abs().max().item() <= 1e-3
        ids = torch.tensor([rows[0]])
        ref_new = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=64,
            do_sample=False,
            min_new_tokens=64,
            eos_token_id=None,
            pad_token_id=0,
        )
    got_new = generate_ids(model, [rows[0]], max_new_tokens=64)[0]
    assert ref_new[0, ids.shape[1] :].tolist() == got_new
