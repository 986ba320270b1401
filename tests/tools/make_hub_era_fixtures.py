"""Write the Hub-era test checkpoints with the tools of the time: transformers 4.37.2, tokenizers 0.15, torch 2.13.

Run it in the old environment (``bash tests/tools/make_old_venv.sh`` creates it)::

    .venv-old/bin/python tests/tools/make_hub_era_fixtures.py

It writes ``tests/data/hub_era/kosmos2-tiny-4.37/``, which is committed, so the tests never need the old tools:

* ``config.json`` as 4.37 writes it (every key of each sub-config, ``torch_dtype``, the serialised generation
  defaults such as ``max_length: 20``), ``generation_config.json``;
* ``model.safetensors`` from ``save_pretrained`` (4.37's default) and ``pytorch_model.bin`` from
  ``save_pretrained(safe_serialization=False)``, of one seeded random model with tiny widths (the real 65037-id
  vocabulary, so real prompts fit), stored in float16 to keep the folder small;
* the processor of the real SentencePiece model (``kosmos2_ref/assets/sentencepiece.bpe.model``) as 4.37 saves
  it: ``tokenizer_config.json`` with ``added_tokens_decoder`` and old ``AddedToken`` dicts,
  ``special_tokens_map.json``, ``added_tokens.json``, ``preprocessor_config.json``, ``sentencepiece.bpe.model``
  is dropped (it is the package asset) and ``tokenizer.json`` (Metaspace with ``add_prefix_space``, as tokenizers
  0.15 writes it) is stored as ``tokenizer.stripped.json``, without the vocabulary and character map it copies from
  the SentencePiece model: tests/hub_era.py puts them back, and this script checks that gives 4.37's file exactly.

The weights are drawn as tests/fixtures_model.randomize_ draws them, from seed 437.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import (
    CLIPImageProcessor,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
    Kosmos2Processor,
    XLMRobertaTokenizerFast,
)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "hub_era" / "kosmos2-tiny-4.37"
SPM = REPO / "kosmos2_ref" / "assets" / "sentencepiece.bpe.model"
sys.path.insert(0, str(REPO / "tests"))

sys.path.insert(0, str(REPO))
from fixtures_model import randomize_  # noqa: E402  (torch only: the same draw as the other test checkpoints)
from hub_era import STRIPPED, refill_tokenizer_json, strip_tokenizer_json  # noqa: E402

TINY_4X = {
    "text_config": {
        "vocab_size": 65037,
        "embed_dim": 4,
        "layers": 2,
        "ffn_dim": 8,
        "attention_heads": 2,
        "max_position_embeddings": 128,
    },
    "vision_config": {
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 224,
        "patch_size": 14,
    },
    "latent_query_num": 64,
}
# microsoft/kosmos-2-patch14-224's preprocessor_config.json settings
IMAGE_PROCESSOR = dict(
    do_resize=True,
    size={"shortest_edge": 224},
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
    use_square_size=True,
)


def main() -> None:
    assert transformers.__version__ == "4.37.2", transformers.__version__
    if OUT.exists():
        shutil.rmtree(OUT)
    torch.manual_seed(437)
    model = Kosmos2ForConditionalGeneration(Kosmos2Config(**TINY_4X))
    randomize_(model, seed=437)
    model = model.half().eval()
    model.save_pretrained(OUT)  # model.safetensors (4.37's default)
    bin_dir = OUT.with_name(OUT.name + ".bin-tmp")
    model.save_pretrained(bin_dir, safe_serialization=False)  # pytorch_model.bin, as many fine-tunes are
    shutil.move(bin_dir / "pytorch_model.bin", OUT / "pytorch_model.bin")
    shutil.rmtree(bin_dir)

    tokenizer = XLMRobertaTokenizerFast(vocab_file=str(SPM))  # converted from the SentencePiece model by 4.37
    processor = Kosmos2Processor(CLIPImageProcessor(**IMAGE_PROCESSOR), tokenizer)
    processor.save_pretrained(OUT)
    (OUT / "sentencepiece.bpe.model").unlink(missing_ok=True)  # the package ships it; tokenizer.json is used
    written = json.loads((OUT / "tokenizer.json").read_text(encoding="utf-8"))
    stripped = strip_tokenizer_json(written)
    assert refill_tokenizer_json(stripped) == written, "the refilled tokenizer.json differs from 4.37's"
    (OUT / STRIPPED).write_text(json.dumps(stripped, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "tokenizer.json").unlink()

    versions = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    (OUT / "WRITTEN_BY.json").write_text(json.dumps(versions, indent=2) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.stat().st_size:>9,d}  {f.name}")
    print(versions)


if __name__ == "__main__":
    main()
