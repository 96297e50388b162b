"""Multi-query associative recall (MQAR) data with zoology's semantics (HazyResearch/zoology, multiquery_ar.py),
vectorised.

A sequence of `seq_len` tokens starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...`; keys are distinct
tokens from [1, vocab/2), values distinct tokens from [vocab/2, vocab). The rest is the query region: every key
appears once more, key j at region offset 2 * g_j, where the gaps g are distinct draws from range(space),
space = (seq_len - 2 * kv) / 2, with p(g) proportional to a * (g + 1)^(a - 1) (a = power_a = 0.01: short gaps are
likely). The label at a query key's position is its value (the model must emit the value right after reading the
key); every other label is -100. Other query-region tokens are 0, or uniform random tokens with
`random_non_queries=True`. Sampling without replacement uses argsort of uniform noise (keys, values) and the
Gumbel-top-k trick (gaps), which has the same law as numpy's sequential `choice(..., replace=False, p=p)`.

Train and test sets come from disjoint seed ranges (zoology: train seeds in [0, 2^31/2), test in [2^31/2, 2^31)).
"""

import numpy as np
import torch

MAX_SEED = 2**31


def split_seed(split: str, seed: int = 123) -> int:
    """A data seed for `split` ("train" or "test") from disjoint halves of the seed range, as zoology does."""
    rng = np.random.default_rng(seed)
    train, test = int(rng.integers(0, MAX_SEED // 2)), int(rng.integers(MAX_SEED // 2, MAX_SEED))
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return train if split == "train" else test


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, seq_len] long, labels [n, seq_len] long with -100 where nothing is asked)."""
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}.")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed seq_len ({seq_len}).")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"{num_kv_pairs} key-value pairs need seq_len >= {4 * num_kv_pairs}, got {seq_len}.")
    if num_kv_pairs >= vocab_size // 2 - 1:
        raise ValueError(f"vocab_size {vocab_size} has too few keys for {num_kv_pairs} distinct pairs.")
    rng = np.random.default_rng(seed)
    n, kv, half = num_examples, num_kv_pairs, vocab_size // 2
    context = 2 * kv

    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :kv] + 1  # distinct, in [1, vocab/2)
    values = np.argsort(rng.random((n, vocab_size - half)), axis=1)[:, :kv] + half  # distinct, in [vocab/2, vocab)

    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    gumbel = -np.log(-np.log(rng.random((n, space))))
    gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :kv]  # distinct gap indices, power-law distributed

    sequence = np.zeros((n, seq_len + 1), dtype=np.int64)
    sequence[:, 0:context:2] = keys
    sequence[:, 1:context:2] = values
    rows = np.arange(n)[:, None]
    sequence[rows, context + 2 * gaps] = keys
    labels = np.full((n, seq_len + 1), -100, dtype=np.int64)
    labels[rows, context + 2 * gaps + 1] = values
    inputs, labels = sequence[:, :-1], labels[:, 1:]  # the label at a query key's position is its value
    if random_non_queries:
        filler = inputs == 0
        inputs = np.where(filler, rng.integers(0, vocab_size, size=inputs.shape), inputs)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Zoology's metric: per-example accuracy over the asked positions, averaged over examples."""
    asked = labels != -100
    hits = ((logits.argmax(-1) == labels) & asked).sum(-1).float()
    return float((hits / asked.sum(-1).clamp(min=1)).mean())
