"""A megatrain tokenizer as a Hugging Face fast tokenizer (the `tokenizers` library), with
the same ids and the same decoding.

SentencePiece's BPE here (identity normalisation, no dummy prefix, byte fallback) becomes
a `tokenizers` BPE over the same pieces with merges ranked by the pieces' scores, byte
fallback, and spaces replaced by a marker. megatrain spells a literal U+2581 (SentencePiece's
own space marker) as its three bytes; to keep that, the marker in the exported vocabulary
is U+FFFF (a Unicode noncharacter) instead, so the one text whose ids differ is a literal
U+FFFF. The special pieces (<unk>, <s>, </s>, <pad>, <|endoftext|>) keep their ids, get no
merges, and are never matched in raw text (`split_special_tokens`), as in megatrain.
"""

from __future__ import annotations

from tokenizer.tokenizer import SPACE_MARK, SPECIAL_PIECES, Tokenizer

MARK = "\uffff"
NORMAL_PIECE = 1  # SentencePiece's ModelProto.SentencePiece.Type.NORMAL


def to_hf(tok: Tokenizer, model_max_length: int):
    """A transformers PreTrainedTokenizerFast giving tok's ids."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tok.model_proto)
    pieces = [p.piece.replace(SPACE_MARK, MARK) if p.type == NORMAL_PIECE else p.piece for p in proto.pieces]
    scores = {piece: p.score for piece, p in zip(pieces, proto.pieces, strict=True) if p.type == NORMAL_PIECE}
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges({p: vocab[p] for p in scores}, scores)  # normal pieces only: specials never form
    backend = Backend(
        models.BPE(
            vocab=vocab, merges=merges, byte_fallback=True, unk_token=SPECIAL_PIECES["unk"], fuse_unk=True
        )
    )
    backend.normalizer = normalizers.Replace(" ", MARK)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        split_special_tokens=True,
        unk_token=SPECIAL_PIECES["unk"],
        bos_token=SPECIAL_PIECES["bos"],
        pad_token=SPECIAL_PIECES["pad"],
        eos_token=SPECIAL_PIECES["eod"],
        clean_up_tokenization_spaces=False,
    )
