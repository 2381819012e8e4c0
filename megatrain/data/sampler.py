"""`ResumableSampler`: which samples each data-parallel rank trains on, in what order.

The global order is a sequence of epochs, each a seeded permutation of the dataset.
The sampler's position is `consumed`, the number of samples all ranks together have
taken or skipped, so saving, resuming and skipping N samples are arithmetic. It also
keeps a record of what it skipped (`skipped`: [[position, samples], ...]), saved with
it: a checkpoint says which data its timeline left out (loss-spike rollbacks, data.skip),
and `data.skip` set to that record reproduces the same sample order from scratch. The next
k * world_size samples are dealt round-robin: rank r gets global positions
consumed + r, consumed + r + world_size, ... The global batch is therefore the same set
of samples whatever the world size or micro-batch size, which is what lets a run
resume on a different number of ranks, and lets 1 rank and 2 ranks be compared.
Without `shuffle` the positions are the dataset's own indices (a blend whose mixture
changes with position, megatrain/data/blend.py, shuffles each source itself).
"""

from __future__ import annotations

import numpy as np

from megatrain.data.permutation import Permutation
from megatrain.errors import UserError


class ResumableSampler:
    def __init__(
        self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        if num_samples <= 0:
            raise UserError(f"the dataset has no samples (num_samples={num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples, self.seed = num_samples, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.consumed = 0
        self.skipped: list[list[int]] = []  # [[position, samples], ...] in the order skipped
        self.last_positions = np.empty(0, dtype=np.int64)  # global positions of the last next()
        self._perms: dict[int, Permutation] = {}

    def _permutation(self, epoch: int) -> Permutation:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 2:
                self._perms.clear()
            perm = self._perms[epoch] = Permutation(self.num_samples, (self.seed, epoch))
        return perm

    def at(self, positions) -> np.ndarray:
        """Dataset indices at global positions (a pure function of the seed)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions
        out = np.empty_like(positions)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))(positions[mask] % self.num_samples)
        return out

    def next(self, per_rank: int) -> np.ndarray:
        """This rank's next `per_rank` dataset indices; every rank advances together."""
        positions = self.consumed + self.rank + self.world_size * np.arange(per_rank, dtype=np.int64)
        self.consumed += per_rank * self.world_size
        self.last_positions = positions
        return self.at(positions)

    def skip(self, num_samples: int) -> None:
        """Move past `num_samples` global samples without reading them."""
        if num_samples < 0:
            raise ValueError("cannot skip backwards")
        if num_samples:
            self.skipped.append([self.consumed, num_samples])
        self.consumed += num_samples

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "skipped": [list(s) for s in self.skipped],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise UserError(
                f"sampler state is for {state['num_samples']} samples with seed {state['seed']}, this run "
                "has "
                f"{self.num_samples} with seed {self.seed}: the data, seq_len or seed changed since the "
                "checkpoint"
            )
        self.consumed = int(state["consumed"])
        self.skipped = [list(s) for s in state.get("skipped", [])]
