"""SentencePiece BPE tokenizers for megatrain: train on a corpus, load, encode, decode.

This package depends on nothing else of megatrain's."""

from tokenizer.corpus import CorpusOptions, CorpusStats, iter_pieces, resolve_inputs
from tokenizer.errors import InputError
from tokenizer.tokenizer import Tokenizer
from tokenizer.train import TrainerOptions, TrainReport, train_tokenizer

__all__ = [
    "CorpusOptions",
    "CorpusStats",
    "InputError",
    "Tokenizer",
    "TrainReport",
    "TrainerOptions",
    "iter_pieces",
    "resolve_inputs",
    "train_tokenizer",
]
