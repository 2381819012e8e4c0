"""`BlendedDataset`: several datasets mixed in given proportions, deterministically,
the proportions fixed or changing with the tokens drawn (a mixture schedule,
megatrain/schedule/mixture.py).

Samples come in rounds of ROUND slots. In every round dataset d fills round(w_d *
ROUND) slots (largest remainder, so the counts add up), spread evenly through the
round. Dataset d's k-th draw is its sample perm_e(k mod len_d), where e = k // len_d
and perm_e is a seeded permutation per pass over d: a heavily weighted small dataset
repeats (a new order each pass), a lightly weighted big one is sampled evenly across
all its shards rather than from the front. Sample i is computed directly (O(ROUND)
memory), so the blend is as resumable as a single dataset.

With a schedule, positions are cut into segments at the stage boundaries; rounds start
again at each segment's start, and a round takes the weights of its segment (stepwise)
or of its middle position (linear). How many draws each dataset had before a position
is then a sum over the segments and rounds before it (prefix sums, computed once), so
sample i is still a pure function of i. A scheduled blend is read in order of position
(`ordered`: the sampler must not shuffle positions, which are the schedule's clock);
each dataset is still drawn in its own shuffled order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from megatrain.data.permutation import Permutation
from megatrain.errors import UserError

ROUND = 10_000


def _round_counts(weights: np.ndarray, slots: int = ROUND) -> np.ndarray:
    """Slots per dataset in a round of `slots` (largest remainder), for one weight vector
    [D] or one per round [R, D]."""
    exact = np.atleast_2d(weights) * slots
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), axis=1, kind="stable")
    rank = np.empty_like(order)  # each dataset's place in the order of remainders
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), axis=1)
    counts += rank < (slots - counts.sum(axis=1))[:, None]  # the largest remainders get one more
    return counts if np.ndim(weights) == 2 else counts[0]


@lru_cache(maxsize=64)
def _round_pattern(weights: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per round: how many slots each dataset gets, and for each slot its dataset and
    the draw number within the round (smoothest interleave: greedy on the deficit)."""
    counts = _round_counts(np.array(weights))
    dataset_of = np.empty(ROUND, dtype=np.int64)
    draw_of = np.empty(ROUND, dtype=np.int64)
    taken = np.zeros(len(weights), dtype=np.int64)
    for q in range(ROUND):
        d = int(np.argmax(counts * (q + 1) / ROUND - taken))
        dataset_of[q], draw_of[q] = d, taken[d]
        taken[d] += 1
    return counts, dataset_of, draw_of


class _Segment:
    """Positions [start, end) of a blend with weights moving from w0 to w1 (equal: fixed)."""

    def __init__(self, start: int, end: int | None, w0: np.ndarray, w1: np.ndarray):
        self.start, self.end, self.w0, self.w1 = start, end, w0, w1
        self.fixed = np.array_equal(w0, w1)
        self.base = np.zeros(len(w0), dtype=np.int64)  # draws of each dataset before this segment
        if not self.fixed:  # draws before each round of the segment
            rounds = -(-(end - start) // ROUND)
            counts = _round_counts(np.stack([self.weights(j) for j in range(rounds)]))
            self.before_round = np.concatenate([np.zeros((1, len(w0)), np.int64), np.cumsum(counts, axis=0)])

    def weights(self, j: int) -> np.ndarray:
        """Round j's weights: the segment's, or those at the round's middle position."""
        if self.fixed:
            return self.w0
        length = self.end - self.start
        f = (min((j + 0.5) * ROUND, (j * ROUND + length) / 2)) / length
        return (1 - f) * self.w0 + f * self.w1

    def pattern(self, j: int):
        return _round_pattern(tuple(self.weights(j).tolist()))

    def draws_before(self, j: int) -> np.ndarray:
        """Draws of each dataset in this segment's rounds before round j."""
        return j * self.pattern(0)[0] if self.fixed else self.before_round[j]

    def total_draws(self) -> np.ndarray:
        rounds, rest = divmod(self.end - self.start, ROUND)
        partial = np.bincount(self.pattern(rounds)[1][:rest], minlength=len(self.w0)) if rest else 0
        return self.draws_before(rounds) + partial


class BlendedDataset:
    def __init__(self, datasets_and_weights, seed: int = 0, num_samples: int | None = None, schedule=None):
        """`datasets_and_weights`: [(dataset, weight)]; `schedule`: a MixtureSchedule over the
        same datasets, in the same order, instead of the fixed weights."""
        if not datasets_and_weights:
            raise UserError("a blend needs at least one dataset")
        self.datasets = [d for d, _ in datasets_and_weights]
        weights = np.array([float(w) for _, w in datasets_and_weights])
        if (weights < 0).any() or not np.isfinite(weights).all() or not weights.sum() > 0:
            raise UserError(
                f"blend weights must be non-negative numbers with a positive sum, got {weights.tolist()}"
            )
        seq_lens = {d.seq_len for d in self.datasets}
        if len(seq_lens) != 1:
            raise UserError(f"blended datasets have different seq_len: {sorted(seq_lens)}")
        tokenizers = {getattr(d, "tokenizer_sha256", None) for d in self.datasets}
        if len(tokenizers) > 1:
            raise UserError(
                "blended datasets were made with different tokenizers: "
                + ", ".join(f"{getattr(d, 'dir', d)}" for d in self.datasets)
            )
        self.tokenizer_sha256 = tokenizers.pop()
        self.seq_len = seq_lens.pop()
        self.dtype = np.result_type(*[d.dtype for d in self.datasets])  # the widest token dtype
        self.weights = weights / weights.sum()
        self.seed = seed
        self.num_samples = num_samples if num_samples is not None else sum(len(d) for d in self.datasets)
        self.schedule = schedule  # kept also when unstaged: a run's state records the mixture it drew with
        staged = schedule is not None and schedule.staged
        parts = schedule.segments(self.seq_len) if staged else [(0, None, self.weights, self.weights)]
        self._segments = [_Segment(*part) for part in parts]
        for prev, seg in zip(self._segments, self._segments[1:], strict=False):
            seg.base = prev.base + prev.total_draws()
        self._starts = np.array([s.start for s in self._segments], dtype=np.int64)
        self._perms: dict[tuple[int, int], Permutation] = {}

    @property
    def ordered(self) -> bool:
        """Positions are the schedule's clock: read them in order, not shuffled."""
        return self.schedule is not None and self.schedule.staged

    def __len__(self) -> int:
        return self.num_samples

    def sources(self, indices) -> np.ndarray:
        """The dataset number of each blend index."""
        return self._draws(indices)[0]

    def _draws(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(dataset number, its draw number) for blend indices."""
        indices = np.asarray(indices, dtype=np.int64)
        which, draws = np.empty_like(indices), np.empty_like(indices)
        segment_of = np.searchsorted(self._starts, indices, side="right") - 1
        for s in np.unique(segment_of):
            seg, in_seg = self._segments[s], segment_of == s
            rounds, slots = np.divmod(indices[in_seg] - seg.start, ROUND)
            w, k = np.empty_like(slots), np.empty_like(slots)
            for j in np.unique(rounds):
                m = rounds == j
                _, dataset_of, draw_of = seg.pattern(int(j))
                w[m] = dataset_of[slots[m]]
                k[m] = (seg.base + seg.draws_before(int(j)))[w[m]] + draw_of[slots[m]]
            which[in_seg], draws[in_seg] = w, k
        return which, draws

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(dataset number, sample index within it) for blend indices."""
        which, draws = self._draws(indices)
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
        if i < 0 or (i >= self.num_samples and not self.ordered):  # a staged blend has no end
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        which, sample = self.locate([i])
        return self.datasets[int(which[0])][int(sample[0])]

    def batch(self, indices) -> np.ndarray:
        which, samples = self.locate(indices)
        out = np.empty((len(which), self.seq_len + 1), dtype=self.dtype)
        for row, (d, s) in enumerate(zip(which.tolist(), samples.tolist(), strict=False)):
            out[row] = self.datasets[d][s]
        return out
