"""A small reader of SentencePiece ``.model`` files (a serialised ``sentencepiece.ModelProto``).

Only the fields needed to rebuild the tokenizer with the ``tokenizers`` library are read: the pieces (string,
score, type), the trainer's model type and special ids, and the normaliser's name, flags and precompiled
character map. Everything else is skipped by its wire type, so the reader needs neither ``sentencepiece`` nor
``protobuf``.

The field numbers are those of ``sentencepiece_model.proto`` (the same schema transformers ships as
``transformers/utils/sentencepiece_model_pb2.py``). docs/numerics.md §9; PROVENANCE.md lists the facts checked on
the real Kosmos-2 model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..files import file_present, read_bytes

# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

# SentencePiece.Type (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType.
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass(frozen=True)
class Piece:
    """One vocabulary entry: the piece string, its log-probability score and its SentencePiece type."""

    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a ``ModelProto`` that define tokenisation.

    Defaults are the proto defaults, used when a field is absent from the file.
    """

    pieces: list[Piece] = field(default_factory=list)
    model_type: str = "unigram"
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    byte_fallback: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``; return (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in SentencePiece model")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint longer than 10 bytes in SentencePiece model")


def _as_int32(value: int) -> int:
    """Reinterpret a varint as a signed int32/int64 (negative ids such as pad_id = -1 use 10-byte varints)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _iter_fields(buf: bytes):
    """Yield (field number, wire type, value) for every field of one message.

    The value is an int for varints, the raw bytes for length-delimited fields and fixed32/fixed64 fields.
    """
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated length-delimited field in SentencePiece model")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == _FIXED32:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == _FIXED64:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in SentencePiece model")
        if pos > end:
            raise ValueError("truncated field in SentencePiece model")
        yield number, wire, value


def _parse_piece(buf: bytes) -> Piece:
    """ModelProto.SentencePiece: piece = 1 (string), score = 2 (float), type = 3 (enum)."""
    piece, score, kind = "", 0.0, NORMAL
    for number, wire, value in _iter_fields(buf):
        if number == 1 and wire == _LENGTH_DELIMITED:
            piece = value.decode("utf-8")
        elif number == 2 and wire == _FIXED32:
            score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == _VARINT:
            kind = value
    return Piece(piece, score, kind)


def _parse_trainer_spec(buf: bytes) -> dict:
    """TrainerSpec: model_type = 3, byte_fallback = 35, unk/bos/eos/pad ids = 40/41/42/43."""
    out: dict = {}
    names = {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    for number, wire, value in _iter_fields(buf):
        if wire != _VARINT:
            continue
        if number == 3:
            out["model_type"] = MODEL_TYPES.get(value, f"unknown({value})")
        elif number == 35:
            out["byte_fallback"] = bool(value)
        elif number in names:
            out[names[number]] = _as_int32(value)
    return out


def _parse_normalizer_spec(buf: bytes) -> dict:
    """NormalizerSpec: name = 1, precompiled_charsmap = 2, add_dummy_prefix = 3,
    remove_extra_whitespaces = 4, escape_whitespaces = 5."""
    out: dict = {}
    flags = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, wire, value in _iter_fields(buf):
        if number == 1 and wire == _LENGTH_DELIMITED:
            out["normalizer_name"] = value.decode("utf-8")
        elif number == 2 and wire == _LENGTH_DELIMITED:
            out["precompiled_charsmap"] = bytes(value)
        elif number in flags and wire == _VARINT:
            out[flags[number]] = bool(value)
    return out


def parse_sentencepiece_model(data: bytes) -> SentencePieceModel:
    """Parse the bytes of a ``.model`` file: ModelProto pieces = 1, trainer_spec = 2, normalizer_spec = 3."""
    pieces: list[Piece] = []
    fields: dict = {}
    for number, wire, value in _iter_fields(data):
        if wire != _LENGTH_DELIMITED:
            continue
        if number == 1:
            pieces.append(_parse_piece(value))
        elif number == 2:
            fields.update(_parse_trainer_spec(value))
        elif number == 3:
            fields.update(_parse_normalizer_spec(value))
    if not pieces:
        raise ValueError("the SentencePiece model holds no pieces")
    return SentencePieceModel(pieces=pieces, **fields)


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Read and parse a SentencePiece ``.model`` file, raising ValueError naming the file if it is not one."""
    path = Path(path)
    if not file_present(path):
        raise ValueError(f"SentencePiece model file not found: {str(path)!r}")
    data = read_bytes(path)
    try:
        return parse_sentencepiece_model(data)
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(f"{str(path)!r} is not a readable SentencePiece model file: {err}") from err
