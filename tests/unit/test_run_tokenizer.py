"""A run keeps the tokenizer it trained with (megatrain/train/run_tokenizer.py): prepared data
carries a copy, the run copies it, checked against the data's hash, and the tools find it."""

from __future__ import annotations

import pytest
from helpers import SMALL_CORPUS

from megatrain.data import TokenDataset
from megatrain.errors import UserError
from megatrain.train import run_tokenizer
from tokenizer import Tokenizer, TrainerOptions, train_tokenizer


def test_the_run_keeps_the_datas_tokenizer_and_the_tools_find_it(small_data, tmp_path):
    sha = TokenDataset(small_data, 8).tokenizer_sha256
    assert Tokenizer.load(small_data / "tokenizer").sha256 == sha  # prepare_data.py left it there
    run = tmp_path / "run"
    assert run_tokenizer.keep(run, [str(small_data)], sha, write=False) == run / "tokenizer"
    assert not (run / "tokenizer").exists()  # not rank 0: checks only
    for data in (small_data, small_data / "train"):  # a data path may name the split itself
        assert run_tokenizer.keep(run, [str(data)], sha, write=True) == run / "tokenizer"
    for source in (run, run / "checkpoints" / "step-00000006"):
        assert run_tokenizer.for_run(source, None).sha256 == sha
    assert run_tokenizer.keep(tmp_path / "other-run", [str(tmp_path / "bare")], sha, write=True) is None


def test_a_tokenizer_other_than_the_datas_is_refused_in_one_line(small_data, tmp_path):
    other = tmp_path / "other"
    train_tokenizer(SMALL_CORPUS, other, TrainerOptions(vocab_size=500), progress=False)
    sha = TokenDataset(small_data, 8).tokenizer_sha256
    run = tmp_path / "run"
    Tokenizer.load(other).save(run / "tokenizer")  # a run dir whose data changed tokenizer
    refused = r"run/tokenizer: the run's tokenizer \(sha256 \w{12}\) is not the one the data was made with"
    with pytest.raises(UserError, match=refused):
        run_tokenizer.keep(run, [str(small_data)], sha, write=True)
    with pytest.raises(UserError, match="no tokenizer kept in this run directory"):
        run_tokenizer.for_run(tmp_path / "old-run", None)
