"""Test helpers that write Kosmos-2 tokenizer and processor files into a folder.

``write_tokenizer_files(folder, kind)`` writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and
preprocessor_config.json such that both ``transformers.AutoProcessor.from_pretrained(folder)`` and
``kosmos2_ref.processing.Kosmos2Processor.from_pretrained(folder)`` load the folder.

* ``kind="synthetic"``: a small Unigram vocabulary (ASCII characters and a few hundred English words) padded with
  dummy pieces to the Kosmos-2 id layout, so every id up to 65036 exists (docs/numerics.md §9):
  ``<s> <pad> </s> <unk>`` at 0..3, pieces at 4..64000, ``<mask>`` at 64001, the 11 tags at 64002..64012, the
  1024 patch tokens at 64013..65036. Built with ``tokenizers`` only; the heavy part is cached.
* ``kind="real"``: the real Kosmos-2 tokenizer, built from the SentencePiece model the package ships in
  ``kosmos2_ref/assets`` (our own reader; tests/parity checks it against transformers' converter and against
  sentencepiece itself).

The tokenizer.json pipeline (WhitespaceSplit + Metaspace "always", XLM-R template) is the one transformers 5.x's
``XLMRobertaTokenizer`` rebuilds, so transformers reads the same tokenizer whether it takes tokenizer.json as it is
(folders with a kosmos-2 config.json) or through that class (folders without one).
"""

from __future__ import annotations

import functools
import json
import shutil
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

# Everything the tests read lies inside the repository: the real SentencePiece model is a package asset, the
# photos are in tests/data (tests/data/PROVENANCE.md gives their source, licence and sha256).
REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
REAL_SPM_MODEL = REPO / "kosmos2_ref" / "assets" / "sentencepiece.bpe.model"
IMAGES = TEST_DATA / "images"

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MASK = "<mask>"
TAGS = [
    "</doc>", "<image>", "</image>", "</chunk>", "</line>", "<phrase>", "</phrase>", "<object>", "</object>",
    "</delimiter_of_multi_objects/>", "<grounding>",
]  # fmt: skip
NUM_PIECES = 64000  # SentencePiece pieces; the base vocabulary has NUM_PIECES + 2 ids (fairseq layout)

# Words used by the tests (and hypothesis strategies); each is a whole piece "▁word" in the synthetic vocabulary.
WORDS = """
an image of a snowman warming himself by fire the and in two puppies sit field grass describe this detail
look here dog dogs cat on with is are it there what where who big small red green blue sky tree house car
person man woman child street water sea beach mountain snow white black yellow picture photo shows standing
next to near front behind left right top bottom two three one some many people group table chair book
""".split()

# docs/numerics.md §12.1: the preprocessor_config.json of microsoft/kosmos-2-patch14-224 (534 bytes on the Hub).
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Kosmos2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
    "use_square_size": True,
}

SPECIAL_TOKENS_MAP = {
    "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
    "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>",
}  # fmt: skip

TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizer",
    "processor_class": "Kosmos2Processor",
    "add_prefix_space": True,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
    **SPECIAL_TOKENS_MAP,
}


def _synthetic_vocab() -> list[tuple[str, float]]:
    """Unigram pieces for ids 4..64000: words, "▁"+char, chars, then dummy pieces no test text contains."""
    pieces: list[tuple[str, float]] = [("▁", -6.0)]
    pieces += [("▁" + w, -5.0 - 0.001 * i) for i, w in enumerate(WORDS)]
    pieces += [("▁" + w.capitalize(), -6.0 - 0.001 * i) for i, w in enumerate(WORDS)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("▁" + c, -9.0) for c in chars]
    pieces += [(c, -10.0) for c in chars]
    seen = set()
    unique = []
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            unique.append((piece, score))
    unique += [(f"\ue000dummy{i}", -30.0) for i in range(NUM_PIECES - 3 - len(unique))]
    assert len(unique) == NUM_PIECES - 3
    return unique


@functools.lru_cache(maxsize=1)
def synthetic_tokenizer_json() -> str:
    """The synthetic tokenizer.json (a string; building it takes a fraction of a second, once)."""
    vocab = [(name, 0.0) for name in SPECIALS] + _synthetic_vocab() + [(MASK, 0.0)]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS + [MASK]])
    names = TAGS + [f"<patch_index_{i:04d}>" for i in range(1024)]
    tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False, special=False) for t in names])
    assert tokenizer.get_vocab_size() == 65037
    return tokenizer.to_str()


@functools.lru_cache(maxsize=1)
def real_tokenizer_json() -> str:
    """The real Kosmos-2 tokenizer.json, built from the SentencePiece model by kosmos2_ref."""
    from kosmos2_ref.processing.tokenizer import build_tokenizer_from_sentencepiece

    return build_tokenizer_from_sentencepiece(REAL_SPM_MODEL).to_str()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_files(folder, kind: str = "synthetic", **tokenizer_config_overrides) -> Path:
    """Write the tokenizer and processor files of ``kind`` ("synthetic" or "real") into ``folder``.

    ``tokenizer_config_overrides`` change tokenizer_config.json entries (e.g. ``padding_side="left"``).
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "synthetic":
        text = synthetic_tokenizer_json()
    elif kind == "real":
        text = real_tokenizer_json()
    else:
        raise ValueError(f"kind must be 'synthetic' or 'real', got {kind!r}")
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {**TOKENIZER_CONFIG, **tokenizer_config_overrides})
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    return folder


def write_sentencepiece_folder(folder, model: Path = REAL_SPM_MODEL) -> Path:
    """A folder as the original release ships it: sentencepiece.bpe.model, no tokenizer.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "sentencepiece.bpe.model")
    _write_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    return folder
