"""The parallel layout, built once (torchtitan's ParallelDims): every axis's size, this rank's
place on them, what ZeRO's stage implies. Everything that needs a coordinate reads it here;
the planner plans with the same class. Ranks are laid out as DeepSpeed lays them out:
stage-major pipelines, T consecutive ranks per tensor-parallel group. A new axis (experts,
sequence) is a size here, its coordinate, and the code that uses it.

    layout = Layout.from_config(cfg, world=dist.world_size(), rank=dist.rank())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatrain.errors import UserError


@dataclass(frozen=True)
class Layout:
    zero_stage: int
    tensor_parallel: int
    pipeline_stages: int
    data_parallel: int
    micro_batch: int = 1
    activation_checkpointing: bool = False
    rank: int = 0  # this process's global rank (the planner's layouts: 0)
    # MoE: E consecutive data-parallel ranks compute each block's experts together (E ranks of
    # an expert-parallel group send each token to the rank computing its expert).
    expert_parallel: int = 1
    # Megatron's sequence parallelism within the tensor-parallel groups (T > 1).
    sequence_parallel: bool = False

    @classmethod
    def from_config(cls, cfg, world: int, rank: int = 0) -> Layout:
        """From cfg.parallel (and the micro-batch and checkpointing the planner varies);
        `world` ranks must divide into whole pipelines and tensor-parallel groups."""
        par = cfg.parallel
        P, T = par.pipeline_stages, par.tensor_parallel
        for key, size in (
            ("pipeline_stages", P),
            ("tensor_parallel", T),
            ("pipeline_stages x tensor_parallel", P * T),
        ):
            if world % size:
                raise UserError(f"parallel.{key}={size} does not divide the {world} ranks")
        dp, ep = world // (T * P), par.expert_parallel
        if dp % ep:
            raise UserError(f"parallel.expert_parallel={ep} does not divide the {dp} data-parallel ranks")
        return cls(
            par.zero_stage,
            T,
            P,
            dp,
            cfg.train.micro_batch,
            cfg.model.activation_checkpointing or par.activation_checkpoint_interval > 0,
            rank,
            ep,
            par.sequence_parallel,
        )

    @classmethod
    def from_checkpoint(cls, form: dict) -> Layout:
        """The layout a checkpoint was written on (its megatrain.json "layout")."""
        return cls(
            form["zero_stage"],
            form["tensor_parallel"],
            form["pipeline_stages"],
            form["dp_size"],
            expert_parallel=form.get("expert_parallel", 1),
        )

    def checkpoint_form(self) -> dict:
        """What a checkpoint records of the layout (megatrain.json "layout"). Under tensor
        parallelism the vocabulary tables are split by rows (`vocabulary_split`): a tensor-
        parallel checkpoint from before, with whole tables, then differs and is read through
        the layout-free form, which takes its tables whole."""
        form = {
            "dp_size": self.data_parallel,
            "zero_stage": self.zero_stage,
            "pipeline_stages": self.pipeline_stages,
            "tensor_parallel": self.tensor_parallel,
        }
        if self.tensor_parallel > 1:
            form["vocabulary_split"] = True
        if self.experts_split:  # each rank's file holds its experts (train/expert_shards.py)
            form["expert_parallel"] = self.expert_parallel
        return form

    @property
    def world(self) -> int:
        return self.tensor_parallel * self.pipeline_stages * self.data_parallel

    @property
    def pipeline(self) -> bool:
        return self.pipeline_stages > 1

    @property
    def stage(self) -> int:
        """The pipeline stage (0 without a pipeline)."""
        return self.rank // (self.data_parallel * self.tensor_parallel)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank trains on: the ranks of one pipeline
        or one tensor-parallel group draw the same samples."""
        return self.rank % (self.data_parallel * self.tensor_parallel) // self.tensor_parallel

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group (which slice of the experts it computes)."""
        return self.dp_rank % self.expert_parallel

    def expert_parallel_groups(self) -> list[list[int]]:
        """The global ranks of every expert-parallel group: E consecutive data-parallel ranks
        (MoE runs have no pipeline or tensor axis)."""
        E = self.expert_parallel
        return [list(range(first, first + E)) for first in range(0, self.world, E)]

    def expert_replica_groups(self) -> list[list[int]]:
        """The global ranks holding the same experts (the same place in their expert-parallel
        groups), one group per place: their gradients of those experts are summed together."""
        E = self.expert_parallel
        return [list(range(place, self.world, E)) for place in range(E)]

    @property
    def experts_split(self) -> bool:
        """Each rank keeps only the weights, gradients and optimizer state of the experts it
        computes (expert parallelism under ZeRO 0-2; ZeRO-3 partitions every weight itself)."""
        return self.expert_parallel > 1 and self.zero_stage < 3

    @property
    def mp_rank(self) -> int:
        """DeepSpeed's model-parallel rank: which mp_rank_NN checkpoint files are this rank's
        (its place among the P x T ranks of one data-parallel replica, stage-major)."""
        return self.stage * self.tensor_parallel + self.tp_rank

    @property
    def rng_index(self) -> int:
        """Which generators this rank draws from: its own, except that the ranks of a
        tensor-parallel group share theirs (their dropout masks on the activations they all
        hold whole must agree)."""
        return self.rank // self.tensor_parallel

    @property
    def partitioned_parameters(self) -> bool:
        """ZeRO-3: built partitioned (zero.Init), parameters in DeepSpeed-private partitions."""
        return self.zero_stage == 3

    @property
    def flat_partitions(self) -> bool:
        """ZeRO 1-2: the optimizer steps one flat fp32 partition per parameter group."""
        return self.zero_stage in (1, 2)

    def describe(self) -> str:
        stages = f"{self.pipeline_stages} pipeline stages x " if self.pipeline else ""
        sp = " (sequence parallel)" if self.sequence_parallel else ""
        tp = f"tensor-parallel {self.tensor_parallel}{sp} x " if self.tensor_parallel > 1 else ""
        ep = f" (expert-parallel {self.expert_parallel})" if self.expert_parallel > 1 else ""
        return f"{stages}{tp}{self.data_parallel} data-parallel rank(s){ep}, ZeRO-{self.zero_stage}"

    def sets(self) -> str:
        """The --set line that launches this layout."""
        return (
            f"--set parallel.zero_stage={self.zero_stage} --set "
            f"parallel.tensor_parallel={self.tensor_parallel} "
            f"--set parallel.pipeline_stages={self.pipeline_stages} --set "
            f"train.micro_batch={self.micro_batch} "
            f"--set model.activation_checkpointing={str(self.activation_checkpointing).lower()}"
            + (f" --set parallel.expert_parallel={self.expert_parallel}" if self.expert_parallel > 1 else "")
            + (" --set parallel.sequence_parallel=true" if self.sequence_parallel else "")
        )

    def as_dict(self) -> dict:
        """The sizes and choices, without the rank (the planner's JSON)."""
        return {k: v for k, v in asdict(self).items() if k != "rank"}
