"""DeepSpeed's JIT ops (its CPU shared-memory collective, its FusedAdam) built once, ahead of
any run, and loaded by runs without torch's build lock.

DeepSpeed builds an op through torch.utils.cpp_extension.load, which takes a lock file in the
op's build directory even when the op is already built. A process killed while it holds the
file (a preempted rank) leaves it behind, and every later load on any machine sharing that
directory waits on it forever, before step 1, silently. So launch/warm_ops.py (make install)
builds each op once and copies it to ops_dir(), one directory per DeepSpeed, torch, Python and
accelerator; a run loads the copies from there and hands them to DeepSpeed, which then never
builds. An op that was not built ahead is built as DeepSpeed does, one megatrain process at a
time and behind a check that breaks a lock left by a dead process (docs/self-healing.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch

from megatrain.train import ds_internals as wall

# The ops a run may load: the CPU accelerator's collectives at start, FusedAdam with optim.name=adamw.
OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
STALE_LOCK_S = 900  # a build lock older than this, whose holder cannot be checked, is left by a dead one
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
PYTHON = f"py{sys.version_info.major}{sys.version_info.minor}"


def ops_dir() -> Path:
    """Where the built ops are kept: MEGATRAIN_OPS_DIR, else inside this Python environment,
    one folder per (DeepSpeed, torch, Python, accelerator), so no other build is ever loaded."""
    root = Path(os.environ.get("MEGATRAIN_OPS_DIR") or Path(sys.prefix) / "share" / "megatrain-ops")
    accelerator = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    return root / f"deepspeed{deepspeed.__version__}-torch{torch.__version__}-{PYTHON}-{accelerator}"


def builders() -> list:
    """DeepSpeed's builders of OPS that apply to this accelerator."""
    from deepspeed.accelerator import get_accelerator

    found = (get_accelerator().create_op_builder(name) for name in OPS)
    return [b for b in found if b is not None and b.is_compatible(verbose=False)]


def build_all(log=print) -> None:
    """Build each op (DeepSpeed's JIT build) and keep a copy in ops_dir() (warm_ops.py)."""
    out = ops_dir()
    out.mkdir(parents=True, exist_ok=True)
    for builder in builders():
        module = jit_load(builder, log)
        tmp = out / f".{builder.name}{SUFFIX}.tmp"
        shutil.copyfile(module.__file__, tmp)
        os.replace(tmp, out / f"{builder.name}{SUFFIX}")
        log(f"warm_ops: {builder.absolute_name()} ready in {out}")


def load_all(log=print) -> None:
    """Before DeepSpeed starts its process group: every op from ops_dir(), registered with
    DeepSpeed so that it loads none itself; an op not there is built, guarded (jit_load)."""
    for builder in builders():
        path = ops_dir() / f"{builder.name}{SUFFIX}"
        if not path.exists():
            log(f"ops: {builder.name} was not built ahead (launch/warm_ops.py); building it")
            jit_load(builder, log)
            continue
        spec = importlib.util.spec_from_file_location(builder.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        wall.register_op(builder.name, module)


def jit_load(builder, log=print):
    """DeepSpeed's own (locking) build and load of one op, one megatrain process at a time per
    build directory (a kernel lock, released when its holder dies, kill -9 included); torch's
    lock file found there with a dead holder is removed first."""
    build_dir = torch_build_dir(builder.name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "megatrain.flock", "a") as serial:
        fcntl.flock(serial, fcntl.LOCK_EX)
        break_stale_lock(build_dir, log)
        owner = build_dir / "lock.owner"
        owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        try:
            return builder.load(verbose=False)
        finally:
            owner.unlink(missing_ok=True)


def torch_build_dir(name: str) -> Path:
    """Where torch.utils.cpp_extension builds extension `name` (its own rule)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        root = Path(get_default_build_root()) / f"{PYTHON}_{accelerator}"
    return Path(root) / name


def break_stale_lock(build_dir: Path, log=print) -> bool:
    """Remove torch's build lock in `build_dir` when its holder is gone: a megatrain process of
    this host that no longer runs (lock.owner says which), or, when that cannot be checked
    (another host, or a holder that is not megatrain), a lock older than STALE_LOCK_S."""
    lock = build_dir / "lock"
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        try:
            owner = json.loads((build_dir / "lock.owner").read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == socket.gethostname():
            gone, who = not _alive(owner["pid"]), f"pid {owner['pid']} (no longer running)"
        else:
            limit = float(os.environ.get("MEGATRAIN_STALE_LOCK_S", STALE_LOCK_S))
            gone, who = age > limit, f"{owner or 'an unknown holder'}, {age:.0f} s ago (over {limit:.0f} s)"
        if gone:
            lock.unlink(missing_ok=True)
            log(f"ops: removed the build lock {lock} left by {who}")
            return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
