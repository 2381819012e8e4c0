"""Scoring text with a model: the loss of whole documents and bits per byte.

Bits per byte (the summed negative log-likelihood in bits over the text's UTF-8 bytes)
compares runs whose tokenizers differ, which loss per token cannot. Each document is
scored as the data presents it: its first token predicted after the end-of-document
token, every token of it predicted once. A document longer than the context is scored
with a sliding window: windows of seq_len tokens moving by `stride`, each scoring only
the tokens the previous window did not, with up to seq_len - stride tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Score:
    nll: float = 0.0  # nats, summed
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, other: Score) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents

    def summary(self) -> dict:
        loss = self.nll / max(self.tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": self.nll / math.log(2) / max(self.bytes, 1),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


@dataclass
class Scores:
    """A total and one Score per source file."""

    total: Score = field(default_factory=Score)
    files: dict[str, Score] = field(default_factory=dict)

    def add(self, source: str, score: Score) -> None:
        self.total.add(score)
        self.files.setdefault(source, Score()).add(score)

    def summary(self) -> dict:
        return {**self.total.summary(), "files": [{"path": p, **s.summary()} for p, s in self.files.items()]}


@torch.no_grad()
def score_document(model, ids: list[int], nbytes: int, eod_id: int, stride: int | None = None) -> Score:
    """The summed NLL of a document's tokens (see the module docstring)."""
    context = model.cfg.seq_len
    stride = min(stride or context, context)
    tokens = torch.tensor([eod_id, *ids], device=next(model.parameters()).device)
    n = len(ids)  # targets: tokens[1:]
    nll, done, begin = 0.0, 0, 0
    while done < n:
        end = min(begin + context, n)
        logits = model(tokens[begin:end][None])[0].float()
        losses = F.cross_entropy(logits, tokens[begin + 1 : end + 1], reduction="none")
        nll += float(losses[done - begin :].sum(dtype=torch.float64))  # only the targets not scored before
        done = end
        begin += stride
    return Score(nll=nll, tokens=n, bytes=nbytes, documents=1)
