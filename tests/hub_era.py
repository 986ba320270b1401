"""The Hub-era test checkpoint: the folder transformers 4.37.2 (tokenizers 0.15.2, torch 2.13) wrote, committed as
tests/data/hub_era/kosmos2-tiny-4.37 (tests/tools/make_hub_era_fixtures.py wrote it; tests/data/PROVENANCE.md).

One thing is stored smaller than written: ``tokenizer.json`` is committed as ``tokenizer.stripped.json``, without
its two parts that are a copy of the SentencePiece model (the 64002-entry ``model.vocab`` with scores, and the
normaliser's ``precompiled_charsmap``). :func:`refill_tokenizer_json` puts them back from
``kosmos2_ref/assets/sentencepiece.bpe.model``, the model the old tools converted; make_hub_era_fixtures.py
checked, with the old tools, that the refilled JSON equals the written one exactly.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUB_ERA = REPO / "tests" / "data" / "hub_era" / "kosmos2-tiny-4.37"
SPM_MODEL = REPO / "kosmos2_ref" / "assets" / "sentencepiece.bpe.model"
STRIPPED = "tokenizer.stripped.json"
REFILL = "<refilled from sentencepiece.bpe.model>"


def _charsmap_slot(tok: dict) -> dict:
    """The Precompiled normaliser entry of a tokenizer.json dict (4.37 nests it in a Sequence)."""
    norm = tok["normalizer"]
    steps = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
    return next(s for s in steps if s.get("type") == "Precompiled")


def strip_tokenizer_json(tok: dict) -> dict:
    """tokenizer.json minus what the SentencePiece model holds (see the module docstring)."""
    out = json.loads(json.dumps(tok))
    out["model"]["vocab"] = REFILL
    _charsmap_slot(out)["precompiled_charsmap"] = REFILL
    return out


def refill_tokenizer_json(stripped: dict, spm_model: Path = SPM_MODEL) -> dict:
    """The inverse of :func:`strip_tokenizer_json`: the vocabulary as XLM-R's converter lays it out (the four
    fairseq specials with score 0, the pieces from SentencePiece id 3 on with their scores, ``<mask>``) and the
    model's precompiled character map, base64-encoded as tokenizers writes it."""
    from kosmos2_ref.processing.sentencepiece_model import read_sentencepiece_model

    spm = read_sentencepiece_model(spm_model)
    out = json.loads(json.dumps(stripped))
    assert out["model"]["vocab"] == REFILL
    out["model"]["vocab"] = (
        [[t, 0.0] for t in ("<s>", "<pad>", "</s>", "<unk>")]
        + [[p.piece, float(p.score)] for p in spm.pieces[3:]]
        + [["<mask>", 0.0]]
    )
    _charsmap_slot(out)["precompiled_charsmap"] = base64.b64encode(spm.precompiled_charsmap).decode("ascii")
    return out


def hub_era_folder(dst: Path, weights: str = "safetensors", old_metaspace: bool = False) -> Path:
    """A copy of the Hub-era folder in ``dst`` with a full tokenizer.json; ``weights`` keeps "safetensors",
    "bin" or "both" of the two weight files 4.37 wrote. ``old_metaspace`` removes ``prepend_scheme`` from the
    Metaspace pre-tokenizer and decoder, as older tokenizers releases wrote them (0.15.2 writes it beside
    ``add_prefix_space``): an edit by hand, the one thing here no old tool wrote."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    keep = {
        "safetensors": {"model.safetensors"},
        "bin": {"pytorch_model.bin"},
        "both": {"model.safetensors", "pytorch_model.bin"},
    }[weights]
    for f in HUB_ERA.iterdir():
        if f.name in ("model.safetensors", "pytorch_model.bin") and f.name not in keep:
            continue
        if f.name not in (STRIPPED, "WRITTEN_BY.json"):
            shutil.copyfile(f, dst / f.name)
    tok = refill_tokenizer_json(json.loads((HUB_ERA / STRIPPED).read_text(encoding="utf-8")))
    if old_metaspace:
        for part in ("pre_tokenizer", "decoder"):
            assert tok[part]["type"] == "Metaspace"
            tok[part].pop("prepend_scheme", None)
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return dst
