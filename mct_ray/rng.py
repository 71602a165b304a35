"""Randomness as an input: every generator is derived from (config seed, stream, indices).

A stream name separates independent uses (expert init, expert batches, distillation, ...);
indices are e.g. the expert id or the iteration. Nothing is ever seeded from the clock, and a
step can be replayed from its (seed, stream, index) alone.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed from the run seed, a stream name and integer indices."""
    key = [int(seed), zlib.crc32(stream.encode())] + [int(i) for i in indices]
    return int(np.random.SeedSequence(key).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1 << 31, 1], dtype=np.uint64)))


def generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, *indices))
