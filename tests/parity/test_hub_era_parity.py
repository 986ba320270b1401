"""A checkpoint folder as the Hub's were written (transformers 4.37.2, tokenizers 0.15.2, torch 2.13: the committed
tests/data/hub_era/kosmos2-tiny-4.37, see its PROVENANCE.md) loads and matches transformers 5.23 reading the same
folder: processor ids and pixels, logits (max |Δ| ≤ 1e-5 × the reference's scale, printed), and 10 greedy tokens
with the same explicit settings. Once from the model.safetensors 4.37 wrote, once from its pytorch_model.bin.

The folder keeps what 4.37 wrote: a config.json of 70/67 keys per sub-config with ``torch_dtype: float16`` and the
serialised generation defaults (``max_length: 20``, ...), added_tokens.json, special_tokens_map.json, a
tokenizer_config.json with ``added_tokens_decoder`` and old AddedToken dicts, weights stored in float16.
"""

from __future__ import annotations

import json

import fixtures_model as fm
import numpy as np
import pytest
import torch
from fixtures_tokenizer import IMAGES
from hub_era import HUB_ERA, hub_era_folder

from kosmos2_ref import Kosmos2, generate
from kosmos2_ref.config import Kosmos2Config
from kosmos2_ref.processing import Kosmos2Processor
from kosmos2_ref.weights import load_flat

TOL = 1e-5
GREEDY = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=0, max_new_tokens=10)
PROMPTS = ["<grounding> An image of", "<grounding><phrase> a dog</phrase> is", "Describe this image in detail:"]


def test_the_folder_is_what_the_old_tools_wrote():
    written_by = json.loads((HUB_ERA / "WRITTEN_BY.json").read_text())
    assert written_by["transformers"] == "4.37.2" and written_by["tokenizers"].startswith("0.15.")
    cfg = json.loads((HUB_ERA / "config.json").read_text())
    assert cfg["transformers_version"] == "4.37.2" and cfg["torch_dtype"] == "float16"
    assert (len(cfg["text_config"]), len(cfg["vision_config"])) == (70, 67)
    assert cfg["text_config"]["max_length"] == 20
    tok_cfg = json.loads((HUB_ERA / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "XLMRobertaTokenizer" and len(tok_cfg["added_tokens_decoder"]) == 1040
    assert len(json.loads((HUB_ERA / "added_tokens.json").read_text())) == 1035


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def pair(request, tmp_path_factory):
    """(folder, ours, our processor, transformers' model, transformers' processor) on one Hub-era folder."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    folder = hub_era_folder(tmp_path_factory.mktemp(f"hub_era_{request.param}"), weights=request.param)
    hf = Kosmos2ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf_proc = AutoProcessor.from_pretrained(folder, backend="pil")
    return request.param, Kosmos2.from_pretrained(folder), Kosmos2Processor.from_pretrained(folder), hf, hf_proc


def _inputs(proc, prompt, torch_side):
    from PIL import Image

    image = Image.open(IMAGES / "two_dogs.jpg")
    return proc(text=prompt, images=image, return_tensors="pt" if torch_side else "np")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_processor_ids_and_pixels(pair, prompt):
    _, _, ours, _, theirs = pair
    a, b = _inputs(ours, prompt, False), _inputs(theirs, prompt, True)
    for key in ("input_ids", "attention_mask", "image_embeds_position_mask"):
        assert np.array_equal(a[key], b[key].numpy()), key
    err = float(np.abs(a["pixel_values"] - b["pixel_values"].numpy()).max())
    print(f"\n  {prompt!r}: {a['input_ids'].shape[1]} ids equal, pixel_values max|Δ| = {err:.1e}")
    assert err == 0.0


def test_logits_and_ten_greedy_tokens(pair):
    weights, ours, proc, hf, hf_proc = pair
    print()
    for prompt in PROMPTS:
        a, b = _inputs(proc, prompt, False), _inputs(hf_proc, prompt, True)
        with torch.no_grad():
            ref = hf(
                pixel_values=b["pixel_values"],
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                image_embeds_position_mask=b["image_embeds_position_mask"],
            ).logits
            ref_ids = hf.generate(
                pixel_values=b["pixel_values"],
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                image_embeds_position_mask=b["image_embeds_position_mask"],
                **GREEDY,
            ).numpy()
        out = ours(
            pixel_values=a["pixel_values"],
            input_ids=a["input_ids"],
            attention_mask=a["attention_mask"],
            image_embeds_position_mask=a["image_embeds_position_mask"],
        )
        fm.check(f"logits, 4.37 {weights}, {prompt[:24]!r}", out.logits, ref, TOL)
        ids = generate(
            ours,
            **{k: a[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_embeds_position_mask")},
            **GREEDY,
        )
        new = ids[0, a["input_ids"].shape[1] :].tolist()
        print(f"    10 greedy tokens: {new} (equal: {np.array_equal(ids, ref_ids)})")
        assert ref_ids.shape[1] == a["input_ids"].shape[1] + 10
        assert np.array_equal(ids, ref_ids)


def test_the_old_bin_and_safetensors_hold_the_same_bits(tmp_path):
    """The .bin 4.37 wrote (its own storage layout, the tied head as a second view) equals its safetensors."""
    both = hub_era_folder(tmp_path / "both", weights="both")
    st = hub_era_folder(tmp_path / "st", weights="safetensors")
    bn = hub_era_folder(tmp_path / "bin", weights="bin")
    cfg = Kosmos2Config.from_pretrained(st)
    for storage in ("float32", "float16"):
        a, b, c = load_flat(st, cfg, storage), load_flat(bn, cfg, storage), load_flat(both, cfg, storage)
        assert a.keys() == b.keys() == c.keys()
        for k in a:
            assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k
            assert np.array_equal(a[k].view(np.uint8), c[k].view(np.uint8)), k


def test_old_metaspace_without_prepend_scheme(tmp_path):
    """A tokenizer.json as older tokenizers releases wrote it (Metaspace with add_prefix_space and no
    prepend_scheme): the same ids as transformers 5.23 on the same folder."""
    from transformers import AutoProcessor

    folder = hub_era_folder(tmp_path / "old_metaspace", old_metaspace=True)
    pre = json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["add_prefix_space"] is True and "prepend_scheme" not in pre
    ours, theirs = Kosmos2Processor.from_pretrained(folder), AutoProcessor.from_pretrained(folder, backend="pil")
    texts = PROMPTS + ["  two  spaces", "naïve café", "<phrase>x</phrase><object><patch_index_0001>"]
    for text in texts:
        a, b = ours(text=text), theirs(text=text, return_tensors="np")
        assert a["input_ids"].tolist() == b["input_ids"].tolist(), text
        assert ours.decode(a["input_ids"][0]) == theirs.decode(b["input_ids"][0]), text
