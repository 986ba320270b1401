"""Write the miniature's tokenizer and image-processor files (dev tool; its output is committed).

The vocabulary keeps the Kosmos-2 id layout with few pieces: ``<s> <pad> </s> <unk>`` at 0..3, the pieces, then
``<mask>``, the 11 tags and the 1024 ``<patch_index_XXXX>`` tokens last. Pieces are the words of the synthetic
world (``kosmos2_ref.world``), a few more, and every printable ASCII character (with and without the word-start
mark ``▁``), so any text tokenises without ``<unk>``. The pipeline (WhitespaceSplit + Metaspace "always", the
XLM-R template ``<s> $A </s>``) is the one transformers' ``XLMRobertaTokenizer`` builds, so both our
``Kosmos2Processor.from_pretrained`` and transformers' ``AutoProcessor`` read the folder.

    python training/make_mini_tokenizer.py kosmos2_ref/assets/mini
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

IMAGE_SIZE = 112
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MASK = "<mask>"
TAGS = [
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
]
WORDS = """an image of a and the two three four one it is there are in this picture
red green blue yellow circle circles square squares triangle triangles""".split()

SPECIAL_TOKENS_MAP = {
    "bos_token": "<s>",
    "cls_token": "<s>",
    "eos_token": "</s>",
    "mask_token": "<mask>",
    "pad_token": "<pad>",
    "sep_token": "</s>",
    "unk_token": "<unk>",
}
TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizer",
    "processor_class": "Kosmos2Processor",
    "add_prefix_space": True,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
    **SPECIAL_TOKENS_MAP,
}
# Kosmos-2's CLIP preprocessing (every picture squashed to a square, no crop), at the miniature's image size.
# Not Kosmos-2's own flags: with use_square_size, transformers 5.x squashes to its class default of 224 whatever
# "size" says, and a 112 crop would then keep only the middle quarter of the picture (the runs up to v6 trained
# on that). A plain height x width resize gives the real model's squash at 112 in both libraries.
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
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
    "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "use_square_size": False,
}


def pieces() -> list[tuple[str, float]]:
    """Unigram pieces and scores: whole words first (they win over spelling out), then characters."""
    out = [("▁" + w, -2.0) for w in WORDS] + [("▁" + w.capitalize(), -2.5) for w in WORDS] + [("▁", -8.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    out += [("▁" + c, -9.0) for c in chars] + [(c, -10.0) for c in chars]
    seen, unique = set(), []
    for piece, score in out:
        if piece not in seen:
            seen.add(piece)
            unique.append((piece, score))
    return unique


def build_tokenizer() -> Tokenizer:
    vocab = [(name, 0.0) for name in SPECIALS] + pieces() + [(MASK, 0.0)]
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
    return tokenizer


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    print(f"{out}: vocabulary of {tokenizer.get_vocab_size()} ids")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kosmos2_ref/assets/mini")
