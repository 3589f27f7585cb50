"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models".
Each sequence of length ``T`` starts with ``n_pairs`` key-value pairs ``k1 v1 k2 v2 ...``
(keys from the lower half of the vocabulary, values from the upper half, keys distinct
and values distinct within a sequence). The rest of the sequence is random filler tokens among which every
key appears once more, followed by its value, at a gap from the context drawn from a
power law (``p(gap = i) ∝ i^(alpha-1)``, so short gaps are common and long ones rare).
The model reads the sequence left to right and must predict, at each queried key, the
value paired with it earlier: targets are ``-100`` everywhere except those positions.

Zoology leaves the token after a query as filler; here the value follows its query key again
(not supervised: the answer is predicted at the key), so every position's label is the next token.

Written here (not imported from Zoology) because it must be seeded, vectorised and free of
the network; the sampling follows the paper's description.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARBatch:
    """``inputs [N, T]`` token ids, ``targets [N, T]`` (values at queries, else -100)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def n_answers(self) -> int:
        """Number of supervised (answer) positions in the batch."""
        return int((self.targets != IGNORE_INDEX).sum())


def check_mqar_args(vocab_size: int, seq_len: int, n_pairs: int) -> None:
    """Raise ValueError naming the argument when an MQAR setting is impossible."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if vocab_size < 4 or vocab_size % 2:
        raise ValueError(f"vocab_size must be an even number >= 4, got {vocab_size}")
    if n_pairs > vocab_size // 2:
        raise ValueError(f"n_pairs={n_pairs} needs at least {2 * n_pairs} tokens of vocab_size")
    if seq_len < 4 * n_pairs:
        raise ValueError(
            f"seq_len={seq_len} is too short for n_pairs={n_pairs}: it needs 4*n_pairs = "
            f"{4 * n_pairs} (context pairs plus one query pair per key)"
        )


def make_mqar(
    n_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 256,
    n_pairs: int = 16,
    alpha: float = 0.01,
    seed: int = 0,
) -> MQARBatch:
    """Build ``n_examples`` MQAR sequences; the same arguments always give the same data.

    Keys are drawn from ``[0, vocab_size/2)``, values from ``[vocab_size/2, vocab_size)`` (both
    without repeats in a row, as Zoology), filler tokens from the whole vocabulary. Query slots
    are pairs of positions after the context; slot ``j`` (0-based) is chosen with weight
    ``(j+1)^(alpha-1)`` without replacement (Gumbel top-k), keys are assigned to the chosen slots
    in random order.
    """
    check_mqar_args(vocab_size, seq_len, n_pairs)
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    gen = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    n, ctx = n_examples, 2 * n_pairs

    # distinct keys (and values) per row: the first n_pairs of a random permutation of each half
    keys = torch.rand(n, half, generator=gen).argsort(dim=1)[:, :n_pairs]
    values = half + torch.rand(n, half, generator=gen).argsort(dim=1)[:, :n_pairs]

    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=gen)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values

    # query slots: pairs (2j, 2j+1) in the region after the context, power-law in j
    n_slots = (seq_len - ctx) // 2
    weights = torch.arange(1, n_slots + 1, dtype=torch.float64) ** (alpha - 1.0)
    gumbel = -torch.log(-torch.log(torch.rand(n, n_slots, generator=gen, dtype=torch.float64)))
    slots = (weights.log() + gumbel).topk(n_pairs, dim=1).indices  # [n, n_pairs]
    order = torch.rand(n, n_pairs, generator=gen).argsort(dim=1)  # which key goes to which slot
    q_keys = keys.gather(1, order)
    q_values = values.gather(1, order)
    q_pos = ctx + 2 * slots

    inputs.scatter_(1, q_pos, q_keys)
    inputs.scatter_(1, q_pos + 1, q_values)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets.scatter_(1, q_pos, q_values)  # at the key, predict the next token: its value
    return MQARBatch(inputs=inputs, targets=targets)
