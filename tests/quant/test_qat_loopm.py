"""QAT on a LoopLM: the fake-quantised forward is the quantised model's forward, and QAT then
quantisation beats post-training quantisation at 4 bits on real text."""

import copy

import numpy as np
import pytest
import torch

from looplm.data import prepare_corpus
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import quantize_model
from looplm.quant.qat import apply_qat, remove_qat


@pytest.mark.parametrize("name, group, keep", [("int4", 32, False), ("fp4_mx", None, False),
                                               ("int4", 64, True)])
def test_qat_loopm_forward_matches_the_quantised_model_including_a_tied_head(name, group, keep):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=257, d_model=64, n_heads=4, n_core=2, n_recursions=2,
                              tie_embeddings=True, max_seq_len=32)).eval()
    kw = dict(group_size=group, keep_embeddings=keep, keep_head=keep)
    ids = torch.randint(0, 257, (2, 16))
    qat = apply_qat(copy.deepcopy(model), name, **kw)
    quantised = quantize_model(copy.deepcopy(model), name, kernel="dequant", **kw)
    with torch.no_grad():
        want, got, plain = quantised(ids).logits, qat(ids).logits, model(ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # quantisation changes the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(qat.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(qat.embed.weight, quantised.embed.weight if not keep else model.embed.weight)
    qat(ids).logits.sum().backward()  # straight-through: the float table gets the gradient
    assert qat.embed._parameters["weight"].grad is not None
    remove_qat(qat)
    torch.testing.assert_close(qat(ids).logits, model(ids).logits)


SEQ, BATCH = 64, 16


def _fit(model, batches, lr, decay):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / len(batches) if decay else 1.0)
    for x, y in batches:
        opt.zero_grad()
        model(x, y).loss.backward()
        opt.step()
        sched.step()
    return model


def test_qat_then_quantise_beats_post_training_quantisation_on_a_loopm_at_4_bits(tmp_path):
    """fp4_mx with the (tied) embedding/head quantised too: the only 4-bit setting found where
    PTQ of this test-sized model really hurts (int4 g32/g64 costs < 1%; see docs/results.md)."""
    corpus = prepare_corpus(max_files=20, cache_dir=tmp_path)
    train = torch.from_numpy(np.asarray(corpus.train.tokens, dtype=np.int64))
    val = torch.from_numpy(np.asarray(corpus.val.tokens, dtype=np.int64))
    n_val = min(32 * SEQ, (len(val) - 1) // SEQ * SEQ)
    vx, vy = val[:n_val].view(-1, SEQ), val[1:n_val + 1].view(-1, SEQ)
    gen = torch.Generator().manual_seed(0)

    def batches(n):
        out = []
        for _ in range(n):
            start = torch.randint(0, len(train) - SEQ - 1, (BATCH,), generator=gen).tolist()
            xy = torch.stack([train[i:i + SEQ + 1] for i in start])
            out.append((xy[:, :-1], xy[:, 1:]))
        return out

    def val_loss(model):
        with torch.no_grad():
            return model(vx, vy).loss.item()

    kw = dict(keep_embeddings=False, keep_head=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        base = LoopLM(LoopConfig(vocab_size=corpus.tokenizer.vocab_size, d_model=32, n_heads=2, n_core=2,
                                 max_seq_len=SEQ))
        _fit(base, batches(500), 3e-3, decay=False)
        tune = batches(100)  # the same fine-tuning batches and schedule for both arms
        ft = _fit(copy.deepcopy(base), tune, 1e-3, decay=True)
        float_loss = val_loss(ft)
        ptq = val_loss(quantize_model(ft, "fp4_mx", kernel="dequant", **kw))
        qat = remove_qat(_fit(apply_qat(copy.deepcopy(base), "fp4_mx", **kw), tune, 1e-3, decay=True))
        qat = val_loss(quantize_model(qat, "fp4_mx", kernel="dequant", **kw))
    finally:
        torch.set_num_threads(threads)
    # measured (seeds 0/1/2): PTQ +3.5/+3.6/+3.2 %, QAT +1.3/+1.7/+0.9 % over the float fine-tune
    assert ptq > 1.025 * float_loss  # 4 bits really hurt this model...
    assert qat - float_loss < 0.6 * (ptq - float_loss)  # ...and QAT removes most of that loss
