"""Micro-batches for the loop: the datasets of a run config, the global sample position
(the sampler deals it round-robin over data-parallel ranks, so saving, resuming and
skipping are arithmetic), `data.skip`, and the tokens trained on from each source."""

from __future__ import annotations

import numpy as np
import torch

from megatrain.config import Config
from megatrain.config.schema import DataConfig
from megatrain.data import BlendedDataset, ResumableSampler, TokenDataset
from megatrain.errors import UserError
from megatrain.schedule.mixture import MixtureSchedule
from megatrain.train import distributed as dist


def build_datasets(cfg: Config):
    """Training samples (one dataset or a blend), {name: validation samples}, vocab size."""
    seq_len = cfg.train.seq_len
    datasets = [(TokenDataset(path, seq_len, split="train"), weight) for path, weight in cfg.data.sources()]
    train = (
        datasets[0][0]
        if len(datasets) == 1
        else BlendedDataset(datasets, seed=data_seed(cfg), schedule=MixtureSchedule.from_config(cfg))
    )
    vocab = max(d.manifest["vocab_size"] for d, _ in datasets)
    valid = {}
    for name, path in cfg.data.valid_sets().items():
        try:
            valid[name] = TokenDataset(path, seq_len, split="valid")
        except UserError as e:
            if dist.is_main():
                print(f"warning: no validation set {name!r} ({e})", flush=True)
            continue
        if valid[name].tokenizer_sha256 != datasets[0][0].tokenizer_sha256:
            raise UserError(
                f"{valid[name].dir}: validation data was made with another tokenizer than "
                f"{datasets[0][0].dir}"
            )
    return train, valid, vocab


def data_seed(cfg: Config) -> int:
    return cfg.run.seed if cfg.data.seed is None else cfg.data.seed


def to_micro_batch(tokens: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, seq_len + 1] tokens -> (inputs, targets) as int64 on the device. The tokens travel
    in their compact dtype (uint16 under a 65536 vocabulary), to a GPU from pinned memory
    without blocking, and are widened on the device."""
    host = torch.from_numpy(tokens)
    gpu = device.type == "cuda"
    batch = (host.pin_memory() if gpu else host).to(device, non_blocking=gpu).long()
    return batch[:, :-1], batch[:, 1:]


class TrainBatches:
    """This rank's training micro-batches, in the global order. Stateful: the sampler's
    position and record of skips, how many data.skip entries were applied, and the
    samples trained on from each source (every rank counts the whole global batch's:
    the sources of a position are arithmetic, so no collective is needed)."""

    def __init__(
        self, data: DataConfig, micro_batch: int, dataset, seed: int, dp_rank: int, dp_size: int, device
    ):
        """`data`: cfg.data; `seed`: data_seed(cfg); this rank's share of the global order."""
        self.dataset, self.device, self.micro_batch, self.seq_len = (
            dataset,
            device,
            micro_batch,
            dataset.seq_len,
        )
        self.sampler = ResumableSampler(
            len(dataset),
            seed=seed,
            rank=dp_rank,
            world_size=dp_size,
            shuffle=not getattr(dataset, "ordered", False),
        )
        self.skips = sorted((p, n) for p, n in data.skip)
        self.skip_index = 0  # data.skip entries applied so far
        self.mixture = getattr(dataset, "schedule", None)  # a blend's MixtureSchedule (None: one dataset)
        self.source_names = list(self.mixture.names) if self.mixture else []
        self.source_samples = np.zeros(len(self.source_names), dtype=np.int64)

    @property
    def consumed(self) -> int:
        """Global samples taken or skipped so far, by every rank together."""
        return self.sampler.consumed

    def skip(self, samples: int) -> None:
        self.sampler.skip(samples)

    def at_step_boundary(self) -> None:
        """data.skip: jump past configured positions when the sampler reaches them."""
        while self.skip_index < len(self.skips) and self.consumed >= self.skips[self.skip_index][0]:
            self.sampler.skip(self.skips[self.skip_index][1])
            self.skip_index += 1

    def tokens(self) -> np.ndarray:
        """Host tokens of this rank's next micro-batch ([micro_batch, seq_len + 1])."""
        if self.mixture is not None:  # the sources of every rank's samples of this micro-batch
            every_rank = self.consumed + np.arange(self.micro_batch * self.sampler.world_size)
            self.source_samples += np.bincount(
                self.dataset.sources(self.sampler.at(every_rank)), minlength=len(self.source_samples)
            )
        return self.dataset.batch(self.sampler.next(self.micro_batch))

    def metrics(self) -> dict:
        """For a blend's metrics row: tokens trained on from each source so far, and the
        mixture's stage."""
        if self.mixture is None:
            return {}
        row = {
            "source_tokens": {
                name: int(n) * self.seq_len
                for name, n in zip(self.source_names, self.source_samples, strict=True)
            }
        }
        if self.mixture.staged:  # the stage of the last sample drawn
            row["mixture_stage"] = self.mixture.stage(max(self.consumed - 1, 0) * self.seq_len)
        return row

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_micro_batch(self.tokens(), self.device)

    def state_dict(self) -> dict:
        state = {
            "sampler": self.sampler.state_dict(),
            "skip_index": self.skip_index,
            "source_samples": dict(zip(self.source_names, self.source_samples.tolist(), strict=True)),
        }
        if self.mixture is not None:
            state["mixture"] = self.mixture.describe()
        return state

    def load_state_dict(self, state: dict) -> None:
        mixture = self.mixture.describe() if self.mixture is not None else None
        if "mixture" in state and state["mixture"] != mixture:
            raise UserError(
                f"the data mixture changed since the checkpoint ({state.get('mixture')} then, {mixture} "
                "now): the sample order would not continue; start a new run from the checkpoint with "
                "model.init_from instead"
            )
        self.sampler.load_state_dict(state["sampler"])
        self.skip_index = state["skip_index"]
        saved = state["source_samples"]  # (a source added since: from 0)
        self.source_samples[:] = [saved.get(name, 0) for name in self.source_names]
