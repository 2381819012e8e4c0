"""`Tokenizer`: a trained SentencePiece BPE model plus its recorded special ids.

    tok = Tokenizer.load("runs/demo/tokenizer")
    ids = tok.encode("def f(x):\n    return x\n")
    assert tok.decode(ids) == "def f(x):\n    return x\n"

Round trips are exact for any Unicode text: the model is trained with identity
normalization, no whitespace collapsing, no dummy prefix and byte fallback. The one
character SentencePiece cannot round-trip itself is its own whitespace marker
U+2581 ("▁"), which it decodes as a space; `encode` spells that character as its
three UTF-8 byte tokens instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import sentencepiece as spm

from tokenizer.errors import InputError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
FORMAT = "megatrain-tokenizer/1"
SPACE_MARK = "\u2581"

# Fixed ids, the same for every tokenizer megatrain trains (recorded in tokenizer.json).
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "eod": "<|endoftext|>"}
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "eod": 4}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    def __init__(self, model_proto: bytes, meta: dict, source: str = "<memory>"):
        self.source = source
        self.meta = meta
        self.model_proto = model_proto  # the SentencePiece model file's bytes
        self.sha256 = sha256_bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = meta.get("special_ids", SPECIAL_IDS)
        for name, expected in ids.items():
            piece = self._sp.id_to_piece(expected)
            if piece != SPECIAL_PIECES[name]:
                raise InputError(
                    f"{source}: special token {name!r} should be {SPECIAL_PIECES[name]!r} at id {expected}, "
                    f"found {piece!r}"
                )
        self.unk_id, self.bos_id, self.eos_id = ids["unk"], ids["bos"], ids["eos"]
        self.pad_id, self.eod_id = ids["pad"], ids["eod"]
        self._mark_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        if self._sp.id_to_piece(self._mark_bytes[0]) != "<0xE2>":
            self._mark_bytes = None  # no byte fallback: U+2581 cannot be spelled exactly

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        model_path, meta_path = directory / MODEL_FILE, directory / META_FILE
        if not directory.is_dir():
            raise InputError(
                f"{directory}: no such tokenizer directory (train one with launch/train_tokenizer.py)"
            )
        if not model_path.is_file():
            raise InputError(
                f"{directory}: no {MODEL_FILE} in this directory (train one with launch/train_tokenizer.py)"
            )
        proto = model_path.read_bytes()
        meta = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{meta_path}: damaged tokenizer metadata ({e})") from None
            if meta.get("sha256") not in (None, sha256_bytes(proto)):
                raise InputError(
                    f"{model_path}: sha256 differs from {META_FILE}; the model file was changed or damaged"
                )
        try:
            return cls(proto, meta, source=str(directory))
        except RuntimeError as e:
            raise InputError(f"{model_path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None

    def save(self, directory: str | Path) -> Path:
        """The model and its metadata in `directory`, written under a temporary name and
        renamed (a run directory keeps the tokenizer it trained with this way)."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / MODEL_FILE).write_bytes(self.model_proto)
        (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def token_dtype(self) -> np.dtype:
        """The narrowest unsigned dtype that holds every id (uint16 below 65536)."""
        return np.dtype(np.uint16 if self.vocab_size < 65536 else np.uint32)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        if SPACE_MARK in text and self._mark_bytes:
            return self._encode_with_marks(text)
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Encode many texts; num_threads=0 lets SentencePiece use every core."""
        out = self._sp.encode(list(texts), num_threads=num_threads)
        if self._mark_bytes:
            for i, text in enumerate(texts):
                if SPACE_MARK in text:
                    out[i] = self._encode_with_marks(text)
        return out

    def _encode_with_marks(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(text.split(SPACE_MARK)):
            if k:
                ids.extend(self._mark_bytes)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
