"""The parallel layout: the size of every axis, this rank's place on them, and what ZeRO's
stage implies, in one object built once (torchtitan's ParallelDims). The trainer, the train
module, the model's build, the optimizer's wiring, checkpoints and the planner all read it;
none computes a coordinate from the rank itself.

    layout = Layout.from_config(cfg, world=dist.world_size(), rank=dist.rank())
    layout.dp_rank, layout.tp_rank, layout.stage, layout.describe()

The ranks are laid out as DeepSpeed lays them out: a pipeline's grid is stage-major (the
ranks of stage s are s*D .. s*D+D-1), tensor-parallel groups are T consecutive ranks (its
data x tensor mesh). A new axis (experts, sequence) is a size here, its coordinate, and the
code that uses it.
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

    @classmethod
    def from_config(cls, cfg, world: int, rank: int = 0) -> Layout:
        """From cfg.parallel (and the micro-batch and checkpointing the planner varies);
        `world` ranks must divide into whole pipelines and tensor-parallel groups."""
        par = cfg.parallel
        for key, size in (("pipeline_stages", par.pipeline_stages), ("tensor_parallel", par.tensor_parallel)):
            if world % size:
                raise UserError(f"parallel.{key}={size} does not divide the {world} ranks")
        if world % (par.pipeline_stages * par.tensor_parallel):
            raise UserError(f"parallel.pipeline_stages x parallel.tensor_parallel = "
                            f"{par.pipeline_stages * par.tensor_parallel} does not divide the {world} ranks")
        return cls(par.zero_stage, par.tensor_parallel, par.pipeline_stages,
                   world // (par.tensor_parallel * par.pipeline_stages), cfg.train.micro_batch,
                   cfg.model.activation_checkpointing or par.activation_checkpoint_interval > 0, rank)

    @classmethod
    def from_checkpoint(cls, form: dict) -> Layout:
        """The layout a checkpoint was written on (its megatrain.json "layout")."""
        return cls(form["zero_stage"], form["tensor_parallel"], form["pipeline_stages"], form["dp_size"])

    def checkpoint_form(self) -> dict:
        """What a checkpoint records of the layout (megatrain.json "layout")."""
        return {"dp_size": self.data_parallel, "zero_stage": self.zero_stage, "pipeline_stages": self.pipeline_stages,
                "tensor_parallel": self.tensor_parallel}

    # --- sizes ------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.tensor_parallel * self.pipeline_stages * self.data_parallel

    @property
    def pipeline(self) -> bool:
        return self.pipeline_stages > 1

    # --- this rank's coordinates --------------------------------------------------------

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
    def mp_rank(self) -> int:
        """DeepSpeed's model-parallel rank: which mp_rank_NN checkpoint files are this rank's."""
        return self.stage if self.pipeline else self.tp_rank

    @property
    def rng_index(self) -> int:
        """Which generators this rank draws from: its own, except that the ranks of a
        tensor-parallel group share theirs (their dropout masks on the activations they all
        hold whole must agree)."""
        return self.rank // self.tensor_parallel

    # --- what ZeRO's stage implies ------------------------------------------------------

    @property
    def partitioned_parameters(self) -> bool:
        """ZeRO-3: the model is built partitioned (zero.Init) and its parameters live in
        DeepSpeed-private partitions (no in-memory rollback points)."""
        return self.zero_stage == 3

    @property
    def flat_partitions(self) -> bool:
        """ZeRO 1-2: the optimizer steps one flat fp32 partition per parameter group."""
        return self.zero_stage in (1, 2)

    # --- words --------------------------------------------------------------------------

    def describe(self) -> str:
        stages = f"{self.pipeline_stages} pipeline stages x " if self.pipeline else ""
        tp = f"tensor-parallel {self.tensor_parallel} x " if self.tensor_parallel > 1 else ""
        return f"{stages}{tp}{self.data_parallel} data-parallel rank(s), ZeRO-{self.zero_stage}"

    def sets(self) -> str:
        """The --set line that launches this layout."""
        return (f"--set parallel.zero_stage={self.zero_stage} --set parallel.tensor_parallel={self.tensor_parallel} "
                f"--set parallel.pipeline_stages={self.pipeline_stages} --set train.micro_batch={self.micro_batch} "
                f"--set model.activation_checkpointing={str(self.activation_checkpointing).lower()}")

    def as_dict(self) -> dict:
        """The sizes and choices, without the rank (the planner's JSON)."""
        return {k: v for k, v in asdict(self).items() if k != "rank"}
