"""A seeded pseudo-random permutation of range(n) with O(1) memory and random access.

`Permutation(n, seed)(i)` is where position i of the shuffled order points. It is a
balanced Feistel network over the next power of four >= n, with cycle walking to stay
inside [0, n): a bijection for any round function, so every index appears exactly
once per epoch. Unlike `np.random.permutation` it needs no O(n) table (a 2T-token
corpus has ~1e9 samples), and any position is computed directly, which makes
resume and skip arithmetic.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    def __init__(self, n: int, seed: int | tuple[int, ...]):
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        self.n = n
        bits = max(2, int(n - 1).bit_length()) if n > 1 else 2
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        seed = seed if isinstance(seed, tuple) else (seed,)
        self.keys = np.random.SeedSequence(list(seed)).generate_state(ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        out = self._encrypt(x.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle walking: re-encrypt until back inside [0, n)
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)
