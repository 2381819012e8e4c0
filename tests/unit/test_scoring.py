"""Document scores and bits per byte against a float64 computation of the same quantities."""

from __future__ import annotations

import math

import pytest
import torch

from megatrain.model import GPT, GPTConfig
from megatrain.scoring import Scores, score_document


def _model(seq_len=16):
    cfg = GPTConfig(vocab_size=50, seq_len=seq_len, n_layer=2, n_head=2, d_model=16, init_seed=2)
    return GPT(cfg).eval()


def _reference_nll(model, ids, eod, stride):
    """HF's sliding-window recipe in float64: windows of seq_len moving by stride, each
    scoring only the targets not scored before."""
    tokens = [eod, *ids]
    ctx, n, total, done = model.cfg.seq_len, len(ids), 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        with torch.no_grad():
            logp = model(torch.tensor([tokens[begin:end]]))[0].double().log_softmax(-1)
        for pos in range(done, end):  # target tokens[pos + 1] predicted at window position pos - begin
            total -= float(logp[pos - begin, tokens[pos + 1]])
        done = end
        if end == n:
            break
    return total


@pytest.mark.parametrize("length,stride", [(5, None), (16, None), (40, None), (40, 4), (41, 7)])
def test_document_nll_matches_a_float64_sliding_window(length, stride):
    model = _model()
    ids = torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    score = score_document(model, ids, nbytes=3 * length, eod_id=4, stride=stride)
    assert score.tokens == length and score.documents == 1
    assert score.nll == pytest.approx(_reference_nll(model, ids, 4, stride or 16), rel=1e-5)


def test_bits_per_byte_and_per_file_totals():
    scores = Scores()
    model = _model()
    for source, ids, nbytes in [("a", [1, 2, 3], 10), ("a", [5, 6], 4), ("b", [7, 8, 9, 10], 20)]:
        scores.add(source, score_document(model, ids, nbytes, eod_id=4))
    out = scores.summary()
    assert out["documents"] == 3 and out["tokens"] == 9 and out["bytes"] == 34
    total_nll = out["loss"] * 9
    assert out["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / 34)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert [f["path"] for f in out["files"]] == ["a", "b"] and [f["documents"] for f in out["files"]] == [
        2,
        1,
    ]
    assert sum(f["loss"] * f["tokens"] for f in out["files"]) == pytest.approx(total_nll)
