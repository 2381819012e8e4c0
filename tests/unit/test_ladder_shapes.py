"""The ladder's shape, learning-rate and budget rules (megatrain/scaling/ladder.py), without training."""

from __future__ import annotations

import pytest
from helpers import REPO

from megatrain.config import load_config
from megatrain.errors import UserError
from megatrain.scaling import ladder


def test_rungs_keep_the_targets_family_and_grow_geometrically():
    target = load_config(REPO / "configs" / "llama-1b.yaml")  # grouped-query attention: 4 queries per key
    rungs = ladder.rungs(target, 32000, 4, 2e6, 1e8)
    m = target.model
    head, aspect = m.d_model // m.n_head, m.d_model / m.n_layer
    sizes = [r.non_embedding for r in rungs]
    assert len(rungs) == 4 and sizes == sorted(sizes) and 20 < sizes[-1] / sizes[0] < 200
    for r in rungs:
        assert r.model.d_model // r.model.n_head == head and r.model.arch == "llama"
        assert abs(r.model.d_model / r.model.n_layer - aspect) <= head  # the aspect, to a whole head
        assert r.model.n_head // r.model.n_kv_head in (m.n_head // m.n_kv_head, 1)
        assert r.lr == pytest.approx(target.optim.lr * (m.d_model / r.model.d_model) ** 0.8)
        assert r.params > r.non_embedding  # Chinchilla's N counts the embeddings too
        assert (
            f"model.ffn_hidden={r.model.ffn_hidden}" in r.sets()
        )  # a target's own width does not carry over
    with pytest.raises(UserError, match="give 1 distinct shape"):
        ladder.rungs(target, 32000, 3, 1e3, 2e3)


def test_budgets_are_whole_batches_and_branches_follow_their_trunk(tmp_path):
    target = load_config(REPO / "configs" / "tiny-cpu.yaml")
    rungs = ladder.rungs(target, 4096, 2, 1e4, 1e5)
    jobs = ladder.jobs(rungs, 20, [0.5, 1, 2], tmp_path, "branches", 0.2, 1024, 60000)
    assert len(jobs) == 6
    for rung in rungs:
        mine = [j for j in jobs if j.rung is rung]
        trunk, *branches = mine
        assert trunk.trunk is None and all(b.trunk == trunk.run_dir for b in branches)
        assert all(j.tokens % 1024 == 0 for j in mine) and trunk.tokens > max(b.tokens for b in branches)
        assert trunk.tokens == 2 * 20 * rung.params // 1024 * 1024
    runs = ladder.jobs(rungs, 20, [0.5, 1, 2], tmp_path, "runs", 0.2, 1024, 60000)
    assert len(runs) == 6 and all(j.trunk is None for j in runs)
