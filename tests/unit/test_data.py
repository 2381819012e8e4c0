"""Token shards, TokenDataset, ResumableSampler and BlendedDataset on real files."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import REPO, SMALL_CORPUS, run_script

from megatrain.data import BlendedDataset, Permutation, ResumableSampler, TokenDataset, prepare_dataset
from megatrain.data.shards import ShardWriter, read_manifest
from megatrain.errors import UserError
from megatrain.files import file_sha256
from tokenizer import CorpusOptions, CorpusStats, Tokenizer, iter_pieces, resolve_inputs


def _expected_stream(tokenizer_dir, split_seed=0, valid_fraction=0.05):
    """Encode the corpus directly, document by document, and split it the way prepare does."""
    tok = Tokenizer.load(tokenizer_dir)
    rng = np.random.default_rng(split_seed)
    streams = {"train": [], "valid": []}
    new_doc, split = True, "train"
    for piece in iter_pieces(resolve_inputs(SMALL_CORPUS), CorpusOptions(), CorpusStats()):
        if new_doc:
            split = "valid" if rng.random() < valid_fraction else "train"
        streams[split].extend(tok.encode(piece.text) + ([tok.eod_id] if piece.end else []))
        new_doc = piece.end
    return streams


def test_shards_read_back_equal_to_encoded_stream(small_tokenizer, small_data):
    expected = _expected_stream(small_tokenizer)
    for split in ("train", "valid"):
        ds = TokenDataset(small_data, seq_len=16, split=split)
        assert ds.num_tokens == len(expected[split]) > 0
        assert ds.tokens(0, ds.num_tokens).tolist() == expected[split]
        assert ds.dtype == np.uint16
        manifest = read_manifest(small_data / split)
        assert manifest["num_documents"] == expected[split].count(4)
        for entry in manifest["shards"]:
            assert file_sha256(small_data / split / entry["file"]) == entry["sha256"]
    assert len(read_manifest(small_data / "train")["shards"]) > 1  # 0.1 MB shards: several


def test_same_shards_for_any_worker_count(tmp_path, small_tokenizer, small_data):
    prepare_dataset(
        small_tokenizer, SMALL_CORPUS, tmp_path, valid_fraction=0.05, workers=1, shard_mb=0.1, progress=False
    )
    a, b = read_manifest(small_data / "train"), read_manifest(tmp_path / "train")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_windows_cross_shards_and_batches(small_data):
    ds = TokenDataset(small_data, seq_len=64)
    stream = ds.tokens(0, ds.num_tokens)
    assert len(ds) == (ds.num_tokens - 1) // 64
    for i in [0, 1, len(ds) // 2, len(ds) - 1] + list(range(0, len(ds), 97)):
        assert np.array_equal(ds[i], stream[i * 64 : i * 64 + 65])
    batch = ds.batch([3, 0, 5])
    assert batch.dtype == ds.dtype == np.uint16 and batch.shape == (3, 65)  # widened on the device
    assert np.array_equal(batch[1], stream[:65])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_uint32_tokens_round_trip(tmp_path):
    w = ShardWriter(
        tmp_path / "train",
        "train",
        {"tokenizer_sha256": "x" * 64, "eod_id": 4, "vocab_size": 100_000},
        np.uint32,
        shard_tokens=1000,
    )
    tokens = np.random.default_rng(0).integers(0, 100_000, 3500, dtype=np.uint32)
    tokens[[10, 1999, 3499]] = 4
    for part in np.array_split(tokens, 7):
        w.write(part)
    manifest = w.close()
    assert [s["num_tokens"] for s in manifest["shards"]] == [1000, 1000, 1000, 500]
    assert sum(s["num_documents"] for s in manifest["shards"]) == manifest["num_documents"] == 3
    ds = TokenDataset(tmp_path, seq_len=10)
    assert ds.dtype == np.uint32 and np.array_equal(ds.tokens(0, 3500), tokens)


def test_refuses_directory_of_another_tokenizer(tmp_path, small_data):
    other = tmp_path / "tok2"
    run_script(
        "train_tokenizer.py", "--input", SMALL_CORPUS[0], "--vocab-size", "500", "--out", other, "--quiet"
    )
    out = tmp_path / "data"
    shutil.copytree(small_data, out)
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    proc = run_script(
        "prepare_data.py", "--tokenizer", other, "--input", SMALL_CORPUS[0], "--out", out, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "holds shards made with another tokenizer" in proc.stderr
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before  # untouched


def test_disk_full_removes_partial_shard_and_keeps_earlier(tmp_path, small_tokenizer):
    """A real write failure: the file-size limit makes writes fail with EFBIG, as a full disk would."""
    header = {"tokenizer_sha256": Tokenizer.load(small_tokenizer).sha256, "eod_id": 4, "vocab_size": 1024}
    w = ShardWriter(tmp_path / "train", "train", header, np.uint16, shard_tokens=20_000)
    w.write(np.arange(50_000) % 1000)  # shards 0 and 1 complete, shard 2 half written
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[1]))
        with pytest.raises(
            UserError, match=r"shard-00002.arrow: disk full .*removed the partial shard, the 2 earlier"
        ):
            w.write(np.arange(30_000) % 1000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "manifest.json",
        "shard-00000.arrow",
        "shard-00001.arrow",
    ]
    manifest = read_manifest(tmp_path / "train")
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    for entry in manifest["shards"]:
        assert file_sha256(tmp_path / "train" / entry["file"]) == entry["sha256"]
    with pytest.raises(UserError, match="incomplete"):
        TokenDataset(tmp_path, seq_len=8)


def test_disk_full_through_the_cli(tmp_path, small_tokenizer):
    limit = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))"
    )
    script = REPO / "launch" / "prepare_data.py"
    code = (
        f"{limit}; import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '{script.parent}'); "
        f"runpy.run_path('{script}', run_name='__main__')"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(script),
            "--tokenizer",
            str(small_tokenizer),
            "--input",
            *SMALL_CORPUS,
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "removed the partial shard" in err[0]
    assert not list(tmp_path.rglob("*.tmp"))


def test_damaged_or_missing_shard_detected(tmp_path, small_data):
    shutil.copytree(small_data, tmp_path / "d")
    shard = tmp_path / "d" / "train" / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match="shard-00001.arrow: .* bytes, the manifest says"):
        TokenDataset(tmp_path / "d", seq_len=8)
    shard.unlink()
    with pytest.raises(UserError, match="listed in the manifest but missing"):
        TokenDataset(tmp_path / "d", seq_len=8)
    with pytest.raises(UserError, match="no such data directory"):
        TokenDataset(tmp_path / "nope", seq_len=8)


def test_empty_corpus_changes_nothing(tmp_path, small_tokenizer, small_data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    out = tmp_path / "data"
    shutil.copytree(small_data, out)
    proc = run_script(
        "prepare_data.py",
        "--tokenizer",
        small_tokenizer,
        "--input",
        tmp_path / "empty",
        "--out",
        out,
        check=False,
    )
    assert proc.returncode == 2 and "holds no documents" in proc.stderr
    assert read_manifest(out / "train") == read_manifest(small_data / "train")


# --- sampling ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    for seed in (0, 1, (5, 3)):
        perm = Permutation(n, seed)(np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(Permutation(n, 0)(np.arange(n)), Permutation(n, 1)(np.arange(n)))
        assert not np.array_equal(Permutation(n, 0)(np.arange(n)), np.arange(n))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_ranks_disjoint_and_covering(world):
    n = 103
    samplers = [ResumableSampler(n, seed=7, rank=r, world_size=world) for r in range(world)]
    taken = [[] for _ in range(world)]
    for per_rank in [1, 3, 2, 5, 4] * 30:
        for r, s in enumerate(samplers):
            taken[r].extend(s.next(per_rank).tolist())
    total = sum(len(t) for t in taken)
    assert samplers[0].consumed == total
    flat = [i for step in zip(*taken, strict=True) for i in step]  # round-robin back into global order
    single = ResumableSampler(n, seed=7).next(total).tolist()
    assert flat == single  # the global order does not depend on the world size
    first_epoch = single[:n]
    assert sorted(first_epoch) == list(range(n))  # an epoch covers every sample once
    assert (
        sorted(single[n : 2 * n]) == list(range(n)) and single[n : 2 * n] != first_epoch
    )  # new order next epoch
    for a in range(world):
        for b in range(a + 1, world):
            first = set(taken[a][: n // world]) & set(taken[b][: n // world])
            assert not first  # within an epoch, ranks never share a sample


def test_sampler_skip_and_state():
    s = ResumableSampler(50, seed=1, rank=1, world_size=2)
    s.next(4)
    state = s.state_dict()
    expected = s.next(6).tolist()
    t = ResumableSampler(50, seed=1, rank=1, world_size=2)
    t.load_state_dict(state)
    assert t.next(6).tolist() == expected
    u = ResumableSampler(50, seed=1, rank=1, world_size=2)
    u.skip(state["consumed"])
    assert u.next(6).tolist() == expected
    u.skip(0)
    u.skip(7)  # recorded with where it happened, and restored with the state
    assert u.skipped == [[0, 8], [20, 7]] and u.consumed == 27
    v = ResumableSampler(50, seed=1, rank=1, world_size=2)
    v.load_state_dict(u.state_dict())
    assert v.skipped == u.skipped and v.next(2).tolist() == u.next(2).tolist()
    v.load_state_dict(state)  # an older state: the later skips are not part of it
    assert v.skipped == [] and v.consumed == 8
    with pytest.raises(UserError, match="data, seq_len or seed changed"):
        ResumableSampler(51, seed=1).load_state_dict(state)


def test_resume_exact_in_fresh_process(small_data):
    """Consume k batches, save the state, load it in a new process: the next batches are identical."""
    code = textwrap.dedent(f"""
        import json, sys
        from megatrain.data import ResumableSampler, TokenDataset
        ds = TokenDataset({str(small_data)!r}, seq_len=32)
        s = ResumableSampler(len(ds), seed=3, rank=1, world_size=2)
        if sys.argv[1] == "save":
            for _ in range(5):
                ds.batch(s.next(4))
            print(json.dumps(s.state_dict()))
        else:
            s.load_state_dict(json.loads(sys.argv[2]))
        print(json.dumps([ds.batch(s.next(4)).tolist() for _ in range(3)]))
    """)
    first = subprocess.run([sys.executable, "-c", code, "save"], capture_output=True, text=True, check=True)
    state, batches = first.stdout.splitlines()
    second = subprocess.run(
        [sys.executable, "-c", code, "load", state], capture_output=True, text=True, check=True
    )
    assert json.loads(second.stdout) == json.loads(batches)


def test_blend_proportions_and_determinism(small_data):
    train = TokenDataset(small_data, seq_len=32, split="train")
    valid = TokenDataset(small_data, seq_len=32, split="valid")
    blend = BlendedDataset([(train, 0.3), (valid, 0.7)], seed=0)
    assert len(blend) == len(train) + len(valid)
    which, samples = blend.locate(np.arange(len(blend)))
    share = np.bincount(which, minlength=2) / len(which)
    assert abs(share[1] - 0.7) < 0.01
    for window in (100, 1000):  # mixed evenly, not in long runs
        assert abs(np.mean(which[:window] == 1) - 0.7) < 0.02
    # the small, heavily weighted dataset repeats; each pass over it covers every sample
    valid_draws = samples[which == 1]
    assert sorted(valid_draws[: len(valid)].tolist()) == list(range(len(valid)))
    again = BlendedDataset([(train, 0.3), (valid, 0.7)], seed=0)
    assert np.array_equal(again.batch(range(50)), blend.batch(range(50)))
    assert np.array_equal(blend[5], [train, valid][which[5]][samples[5]])
    with pytest.raises(UserError, match="positive"):
        BlendedDataset([(train, 0)])


def _each_source_drawn_in_order(blend, positions):
    """Every dataset's draws, in position order, are 0, 1, 2, ...: none left out or repeated."""
    which, draws = blend._draws(positions)
    for d in range(len(blend.datasets)):
        assert np.array_equal(draws[which == d], np.arange((which == d).sum())), d


@pytest.mark.parametrize("shape", ["stepwise", "linear"])
def test_mixture_schedule_moves_the_share_at_its_boundaries_and_stays_a_function_of_position(
    small_data, shape
):
    from megatrain.data.blend import ROUND
    from megatrain.schedule.mixture import MixtureSchedule

    seq_len = 32
    train = TokenDataset(small_data, seq_len=seq_len, split="train")
    valid = TokenDataset(small_data, seq_len=seq_len, split="valid")
    # 0.7/0.3 until 30K samples, then 0.2/0.8 (linear: moving between them), 1.0/0 from 70K samples
    frames = ((0, (0.7, 0.3)), (30_000 * seq_len, (2.0, 8.0)), (70_000 * seq_len + 5, (1.0, 0.0)))
    schedule = MixtureSchedule(("train", "valid"), frames, shape)
    blend = BlendedDataset([(train, 0.7), (valid, 0.3)], seed=1, schedule=schedule)
    assert blend.ordered
    positions = np.arange(100_000)
    which = blend.sources(positions)
    _each_source_drawn_in_order(blend, positions)
    for start in range(0, 100_000, ROUND):  # the measured share of each round is the schedule's mean over it
        window = which[start : start + ROUND]
        expected = np.mean([schedule(p * seq_len)[1] for p in range(start, start + ROUND)])
        assert abs(np.mean(window == 1) - expected) < 0.002, (start, expected)
    if shape == "stepwise":  # the boundary falls where the schedule says, to the sample
        assert np.mean(which[29_000:30_000] == 1) == pytest.approx(0.3, abs=0.002)
        assert np.mean(which[30_000:31_000] == 1) == pytest.approx(0.8, abs=0.002)
        assert (
            not (which[70_001:] == 1).any() and (which[69_000:70_001] == 1).any()
        )  # 70K x 32 + 5: sample 70001
    # resumable: any position alone gives what the run in order gave; rows come from the named dataset
    probe = np.array([0, 29_999, 30_000, 45_678, 70_000, 70_001, 99_999])
    w, s = blend.locate(probe)
    assert np.array_equal(w, which[probe])
    for row, (d, i) in zip(blend.batch(probe), zip(w, s, strict=True), strict=True):
        assert np.array_equal(row, [train, valid][d][i])
    again = BlendedDataset([(train, 0.7), (valid, 0.3)], seed=1, schedule=schedule)
    assert np.array_equal(again.batch(probe[::-1]), blend.batch(probe)[::-1])


def test_an_unstaged_schedule_is_the_fixed_blend(small_data):
    from megatrain.schedule.mixture import MixtureSchedule

    train = TokenDataset(small_data, seq_len=32, split="train")
    valid = TokenDataset(small_data, seq_len=32, split="valid")
    fixed = BlendedDataset([(train, 0.3), (valid, 0.7)], seed=0)
    single = BlendedDataset(
        [(train, 0.3), (valid, 0.7)], seed=0, schedule=MixtureSchedule(("t", "v"), ((0, (0.3, 0.7)),))
    )
    assert not single.ordered
    assert all(
        np.array_equal(a, b)
        for a, b in zip(fixed.locate(range(30_000)), single.locate(range(30_000)), strict=True)
    )


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            "[{tokens: 500, weights: {a: 1}}, {tokens: 100, weights: {b: 1}}]",
            "data.stages is not a valid mixture: stage boundaries must increase: 100 tokens comes after 500",
        ),
        (
            "[{tokens: 500, weights: {a: 0, b: 0}}]",
            "data.stages is not a valid mixture: the weights of the stage at 500 "
            "tokens must be non-negative and sum to a positive number, got [0.0, 0.0]",
        ),
        (
            "[{tokens: 500, weights: {a: 1, c: 1}}]",
            "data.stages[0].weights names unknown source(s) ['c']; the sources are ['a', 'b'] (data.path)",
        ),
        ("[{tokens: 500, weight: {a: 1}}]", "data.stages[0] must be {tokens: T, weights: {name: W, ...}}"),
    ],
)
def test_bad_mixture_stages_are_one_line_errors(stages, message):
    from megatrain.config import load_config

    with pytest.raises(UserError) as e:
        load_config(
            None,
            [
                "train.max_steps=1",
                "data.path=[{path: x/a, weight: 1}, {path: y/b, weight: 1}]",
                f"data.stages={stages}",
            ],
        )
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="data.stages need a blend of two or more sources in data.path"):
        load_config(
            None, ["train.max_steps=1", "data.path=x/a", "data.stages=[{tokens: 5, weights: {a: 1}}]"]
        )
    with pytest.raises(
        UserError, match="data.path is not a valid mixture: the weights of the stage at 0 tokens"
    ):
        load_config(None, ["train.max_steps=1", "data.path=[{path: x/a, weight: 0}, {path: y/b, weight: 0}]"])


def test_a_resume_with_another_mixture_is_refused_in_one_line(small_data):
    """The batches' state records the mixture it drew with (megatrain/train/batches.py)."""
    import torch

    from megatrain.config import load_config
    from megatrain.train.batches import TrainBatches, build_datasets, data_seed

    def batches(stage_tokens: int) -> TrainBatches:
        cfg = load_config(
            None,
            [
                "train.max_steps=1",
                "train.seq_len=32",
                "train.micro_batch=4",
                f"data.path=[{{path: {small_data}, name: a}}, {{path: {small_data}, name: b}}]",
                f"data.stages=[{{tokens: {stage_tokens}, weights: {{a: 1, b: 3}}}}]",
            ],
        )
        return TrainBatches(
            cfg.data, cfg.train.micro_batch, build_datasets(cfg)[0], data_seed(cfg), 0, 1, torch.device("cpu")
        )

    first = batches(4096)
    for _ in range(40):
        first.next()
    state = first.state_dict()
    assert (
        sum(state["source_samples"].values()) == 160 and state["source_samples"]["b"] > 40
    )  # stage 2 from 128
    again = batches(4096)
    again.load_state_dict(state)
    assert np.array_equal(again.tokens(), first.tokens())  # the same order from the same state
    with pytest.raises(UserError, match="the data mixture changed since the checkpoint") as e:
        batches(8192).load_state_dict(state)
    assert "\n" not in str(e.value)


def test_a_blends_per_source_tokens_reach_wandb_as_one_key_per_source():
    from megatrain.train.metrics import wandb_values

    row = {
        "kind": "train",
        "step": 7,
        "loss": 2.5,
        "tokens": 4096,
        "mixture_stage": 1,
        "source_tokens": {"old": 3072, "new": 1024},
        "mfu_basis": "cpu-probe",
    }
    assert wandb_values(row) == {
        "train/loss": 2.5,
        "train/tokens": 4096,
        "train/mixture_stage": 1,
        "train/source_tokens/old": 3072,
        "train/source_tokens/new": 1024,
    }
    assert wandb_values({"kind": "valid", "set": "code", "step": 7, "loss": 3.0}) == {"valid/code/loss": 3.0}
    checkpoint = {"kind": "checkpoint", "step": 7, "stall_s": 0.2, "write_s": 4.0}
    assert wandb_values(checkpoint) == {"checkpoint/stall_s": 0.2, "checkpoint/write_s": 4.0}
