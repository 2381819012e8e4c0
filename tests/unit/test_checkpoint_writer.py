"""Background checkpoint writes (checkpoint.async_save): the host copies, the writer thread,
and how a write in flight is settled: published as a synchronous save would publish it, or
removed with a RunError when a writer failed, or abandoned after a stop's budget. One
process (no launcher); the collectives degrade to this rank alone. The whole path through
DeepSpeed and the launcher: tests/e2e/test_async_checkpoint.py."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections import OrderedDict

import pytest
import torch

from megatrain.errors import RunError
from megatrain.train.checkpoint import Checkpointer, Pending
from megatrain.train.checkpoint_writer import BackgroundWriter, HostCopies


def test_host_copies_are_copies_that_keep_sharing_and_reuse_their_buffers():
    weight, moment = torch.randn(4, 3), torch.randn(5)
    scaler = {"scale": 2.0}
    state = OrderedDict(w=weight, tied=weight, opt={"m": [moment]}, scaler=scaler, note="x")
    copies = HostCopies(pinned=False)
    copies.start()
    copied = copies.copy(state, "file")
    copies.finish()
    before = weight.clone(), moment.clone()
    weight.add_(1), moment.add_(1)  # the loop goes on changing its tensors
    scaler["scale"] = 4.0
    assert type(copied) is OrderedDict and copied["note"] == "x" and copied["scaler"] == {"scale": 2.0}
    assert torch.equal(copied["w"], before[0]) and torch.equal(copied["opt"]["m"][0], before[1])
    assert copied["tied"] is copied["w"]  # one tensor met twice stays one, as torch.save keeps it
    assert copies.nbytes == (12 + 5) * 4
    buffer = copied["opt"]["m"][0]
    copies.start()
    again = copies.copy(state, "file")
    copies.finish()
    assert again["opt"]["m"][0] is buffer and torch.equal(buffer, moment)  # the same buffer, new values


def test_the_writer_writes_hashes_and_reports_its_error(tmp_path):
    writer = BackgroundWriter()
    writer.start(tmp_path, [(tmp_path / "a.pt", {"x": torch.arange(3)}), (tmp_path / "b.json", b"{}")])
    assert writer.wait(timeout=60) and writer.error is None
    assert sorted(writer.entries) == ["a.pt", "b.json"] and writer.entries["b.json"]["bytes"] == 2
    assert torch.equal(torch.load(tmp_path / "a.pt")["x"], torch.arange(3))

    class Full:
        def __reduce__(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer.start(tmp_path, [(tmp_path / "c.pt", Full())])
    writer.wait(timeout=60)
    assert writer.failed and writer.error == "No space left on device" and writer.entries is None


def _pending(files: Checkpointer, step: int, content) -> None:
    """A background write of checkpoint `step` in flight: one file with `content`."""
    tmp = files.root / f".tmp-step-{step:08d}"
    tmp.mkdir(parents=True)
    files.writer.start(tmp, [(tmp / "megatrain-rank00000.pt", content)])
    files.pending = Pending(step, tmp, 100)


def test_settle_publishes_a_finished_write_as_a_synchronous_save_would(tmp_path):
    files = Checkpointer(tmp_path, keep=1)
    _pending(files, 3, {"rng": torch.arange(4)})
    (files.root / ".tmp-step-00000003" / "zero_to_fp32.py").write_text("#")  # one no writer reported
    done = files.settle()
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert done["path"] == ckpt and done["step"] == 3 and done["bytes"] == 100 and files.pending is None
    assert files.latest() == ckpt and Checkpointer.verify(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["megatrain-rank00000.pt", "zero_to_fp32.py"]
    _pending(files, 6, {"rng": torch.arange(5)})
    files.settle()
    assert files.complete_checkpoints() == [tmp_path / "checkpoints" / "step-00000006"]  # keep=1 pruned 3


def test_a_failed_write_is_removed_and_latest_stays(tmp_path):
    files = Checkpointer(tmp_path, keep=3)
    _pending(files, 3, {"x": 1})
    files.settle()

    class Full:
        def __reduce__(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _pending(files, 6, Full())
    files.writer.wait(timeout=60)
    assert files.writing() == (False, True)
    with pytest.raises(RunError) as e:
        files.settle()
    assert str(e.value) == (
        f"{tmp_path}/checkpoints/.tmp-step-00000006: checkpoint of step 6 could not be written (rank 0, "
        "writing in the background: No space left on device); removed it, `latest` still names step-00000003"
    )
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000006").exists()
    assert files.latest().name == "step-00000003" and files.pending is None


def test_a_write_past_the_budget_is_abandoned_unpublished(tmp_path):
    files = Checkpointer(tmp_path, keep=3)
    release = threading.Event()

    class Slow:  # a stuck filesystem
        def __reduce__(self):
            release.wait(60)
            return (dict, ())

    _pending(files, 3, Slow())
    assert files.writing() == (True, False)
    assert files.settle(timeout=0.2)["abandoned"] == 3
    assert files.latest() is None and files.complete_checkpoints() == [] and files.pending is None
    release.set()
    files.writer.wait(timeout=60)
