"""`BlendedDataset`: several datasets mixed in fixed proportions, deterministically.

Samples come in rounds of ROUND slots. In every round dataset d fills round(w_d *
ROUND) slots (largest remainder, so the counts add up), spread evenly through the
round. Dataset d's k-th draw is its sample perm_e(k mod len_d), where e = k // len_d
and perm_e is a seeded permutation per pass over d: a heavily weighted small dataset
repeats (a new order each pass), a lightly weighted big one is sampled evenly across
all its shards rather than from the front. Sample i is computed directly (O(ROUND)
memory), so the blend is as resumable as a single dataset.
"""

from __future__ import annotations

import numpy as np

from megatrain.data.permutation import Permutation
from megatrain.errors import UserError

ROUND = 10_000


def _round_pattern(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per round: how many slots each dataset gets, and for each slot its dataset and
    the draw number within the round (smoothest interleave: greedy on the deficit)."""
    exact = weights * ROUND
    counts = np.floor(exact).astype(np.int64)
    for d in np.argsort(-(exact - counts), kind="stable")[: ROUND - counts.sum()]:
        counts[d] += 1
    dataset_of = np.empty(ROUND, dtype=np.int64)
    draw_of = np.empty(ROUND, dtype=np.int64)
    taken = np.zeros(len(weights), dtype=np.int64)
    for q in range(ROUND):
        d = int(np.argmax(counts * (q + 1) / ROUND - taken))
        dataset_of[q], draw_of[q] = d, taken[d]
        taken[d] += 1
    return counts, dataset_of, draw_of


class BlendedDataset:
    def __init__(self, datasets_and_weights, seed: int = 0, num_samples: int | None = None):
        if not datasets_and_weights:
            raise UserError("a blend needs at least one dataset")
        self.datasets = [d for d, _ in datasets_and_weights]
        weights = np.array([float(w) for _, w in datasets_and_weights])
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise UserError(f"blend weights must be positive numbers, got {weights.tolist()}")
        seq_lens = {d.seq_len for d in self.datasets}
        if len(seq_lens) != 1:
            raise UserError(f"blended datasets have different seq_len: {sorted(seq_lens)}")
        tokenizers = {getattr(d, "tokenizer_sha256", None) for d in self.datasets}
        if len(tokenizers) > 1:
            raise UserError("blended datasets were made with different tokenizers: "
                            + ", ".join(f"{getattr(d, 'dir', d)}" for d in self.datasets))
        self.tokenizer_sha256 = tokenizers.pop()
        self.seq_len = seq_lens.pop()
        self.dtype = np.result_type(*[d.dtype for d in self.datasets])  # the widest token dtype
        self.weights = weights / weights.sum()
        self.seed = seed
        self.num_samples = num_samples if num_samples is not None else sum(len(d) for d in self.datasets)
        self._counts, self._dataset_of, self._draw_of = _round_pattern(self.weights)
        self._perms: dict[tuple[int, int], Permutation] = {}

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(dataset number, sample index within it) for blend indices."""
        indices = np.asarray(indices, dtype=np.int64)
        rounds, slots = np.divmod(indices, ROUND)
        which = self._dataset_of[slots]
        draws = rounds * self._counts[which] + self._draw_of[slots]
        samples = np.empty_like(draws)
        for d in np.unique(which):
            mask = which == d
            size = len(self.datasets[d])
            passes, offsets = np.divmod(draws[mask], size)
            out = np.empty_like(offsets)
            for p in np.unique(passes):
                m = passes == p
                out[m] = self._permutation(int(d), int(p), size)(offsets[m])
            samples[mask] = out
        return which, samples

    def _permutation(self, d: int, epoch: int, size: int) -> Permutation:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.datasets):
                self._perms.clear()
            self._perms[key] = Permutation(size, (self.seed, d, epoch))
        return self._perms[key]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        which, sample = self.locate([i])
        return self.datasets[int(which[0])][int(sample[0])]

    def batch(self, indices) -> np.ndarray:
        which, samples = self.locate(indices)
        out = np.empty((len(which), self.seq_len + 1), dtype=self.dtype)
        for row, (d, s) in enumerate(zip(which.tolist(), samples.tolist(), strict=False)):
            out[row] = self.datasets[d][s]
        return out
