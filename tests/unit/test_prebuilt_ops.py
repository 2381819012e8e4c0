"""DeepSpeed's ops without torch's build lock on a run's path (megatrain/train/prebuilt_ops.py):
runs load the copies make install built; an op built at run time breaks a lock its dead
holder left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from megatrain.train import prebuilt_ops


def _copy_built_ops(ext_dir):
    """A private TORCH_EXTENSIONS_DIR holding this machine's builds (a lock put there cannot
    stop any other test), so that a load there is the check-and-load of an op already built."""
    for builder in prebuilt_ops.builders():
        shutil.copytree(prebuilt_ops.torch_build_dir(builder.name), ext_dir / builder.name)


def _python(code: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def _die_holding_the_lock(env: dict) -> None:
    """A process that takes torch's build lock of the shared-memory op, as DeepSpeed's load does,
    and is killed with SIGKILL while it holds it."""
    killed = _python(
        """
        import json, os, signal, socket
        from torch.utils.file_baton import FileBaton
        from megatrain.train import prebuilt_ops
        build_dir = prebuilt_ops.torch_build_dir("deepspeed_shm_comm")
        assert FileBaton(str(build_dir / "lock")).try_acquire()
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        (build_dir / "lock.owner").write_text(json.dumps(owner))  # as jit_load records it
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        env,
    )
    assert killed.returncode == -9, killed.stderr


def test_an_op_built_at_run_time_breaks_the_lock_of_a_dead_holder(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "MEGATRAIN_OPS_DIR": str(tmp_path / "none")}
    _copy_built_ops(tmp_path / "ext")
    _die_holding_the_lock(env)
    assert (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").exists()
    loaded = _python(
        """
        from megatrain.train import prebuilt_ops
        module = prebuilt_ops.jit_load(prebuilt_ops.builders()[0])
        print("loaded", module.__name__)
        """,
        env,
    )
    assert loaded.returncode == 0, loaded.stderr
    lines = loaded.stdout.splitlines()
    assert lines[-1] == "loaded deepspeed_shm_comm"
    assert any("removed the build lock" in line and "no longer running" in line for line in lines)
    assert not (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").exists()


def test_a_lock_whose_holder_cannot_be_checked_is_broken_only_when_old(tmp_path, monkeypatch):
    build_dir = tmp_path / "op"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    (build_dir / "lock.owner").write_text('{"host": "another-node", "pid": 1}')
    said = []
    assert not prebuilt_ops.break_stale_lock(build_dir, said.append)  # fresh: a build may be running
    old = os.stat(build_dir / "lock").st_mtime - prebuilt_ops.STALE_LOCK_S - 1
    os.utime(build_dir / "lock", (old, old))
    assert prebuilt_ops.break_stale_lock(build_dir, said.append)
    assert not (build_dir / "lock").exists() and len(said) == 1 and "another-node" in said[0]
    (build_dir / "lock").touch()  # a live holder on this host is waited for, however old
    (build_dir / "lock.owner").write_text(f'{{"host": "{os.uname().nodename}", "pid": {os.getpid()}}}')
    os.utime(build_dir / "lock", (old, old))
    assert not prebuilt_ops.break_stale_lock(build_dir, said.append) and (build_dir / "lock").exists()


def test_runs_load_the_ops_built_ahead_without_building_or_locking(tmp_path):
    """The copies in ops_dir() are what DeepSpeed's builders return: its JIT loader is never
    called, so its lock (here, one left by a killed process) cannot stop a start."""
    if not all(
        (prebuilt_ops.ops_dir() / f"{b.name}{prebuilt_ops.SUFFIX}").exists() for b in prebuilt_ops.builders()
    ):
        pytest.fail(f"no ops built ahead in {prebuilt_ops.ops_dir()}: make install runs launch/warm_ops.py")
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    _copy_built_ops(tmp_path / "ext")
    _die_holding_the_lock(env)
    loaded = _python(
        """
        from deepspeed.ops.op_builder import builder
        from megatrain.train import prebuilt_ops
        builder.OpBuilder.jit_load = None  # a build or a JIT load would fail here
        prebuilt_ops.load_all()
        print(sorted(b.load().__name__ for b in prebuilt_ops.builders()))
        """,
        env,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines()[-1] == "['deepspeed_shm_comm', 'fused_adam']"
    assert (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").exists()  # untouched
