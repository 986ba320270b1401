"""The CuPy backend against transformers (and against our NumPy backend). Runs only where CuPy and a GPU are;
elsewhere each test is collected and skipped with the reason shown. The whole parity suite also runs on CuPy
with ``KOSMOS2_BACKEND=cupy pytest tests/parity``."""

from __future__ import annotations

import fixtures_model as fm
import numpy as np
import pytest
import torch

from kosmos2_ref import Kosmos2, to_numpy
from kosmos2_ref.backend import cupy_available

HAS_CUPY, WHY = cupy_available()
pytestmark = pytest.mark.skipif(not HAS_CUPY, reason=f"no GPU for the CuPy backend here: {WHY}")
TOL = 1e-5


def _inputs():
    rows = [fm.image_prompt_ids([712, 1648, 9, 10], 64), fm.image_prompt_ids([64012, 712], 64)]
    ids, att, img = fm.padded_batch(rows, "left")
    pv = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    return pv, ids, att, img


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_cupy_forward_matches_numpy_and_transformers(tiny_checkpoint, storage):
    import cupy

    folder, hf = tiny_checkpoint
    gpu = Kosmos2.from_pretrained(folder, backend="cupy", dtype=storage)
    cpu = Kosmos2.from_pretrained(folder, backend="numpy", dtype=storage)
    pv, ids, att, img = _inputs()
    kw = dict(input_ids=ids, attention_mask=att, image_embeds_position_mask=img)
    out = gpu(pixel_values=pv, **kw)
    assert isinstance(out.logits, cupy.ndarray)
    print()
    fm.check(f"cupy vs numpy logits ({storage})", to_numpy(out.logits), cpu(pixel_values=pv, **kw).logits, TOL)
    if storage == "float32":
        with torch.no_grad():
            ref = hf(pixel_values=torch.from_numpy(pv), **{k: torch.from_numpy(v) for k, v in kw.items()})
        real = att.astype(bool)
        fm.check("cupy vs transformers logits", to_numpy(out.logits)[real], ref.logits.numpy()[real], TOL)
