"""The shipped miniature still does its three jobs: accuracy on 40 held-out scenes, with our NumPy model alone.

The scenes, the jobs and the scoring rules are those of ``training/evaluate_mini.py`` (seeds from 1.5·10^9;
training never draws a seed above 10^9). Each bar is the rate measured on 500 scenes (docs/miniature.md: caption
naming 0.928, caption boxes 0.942, ground 0.928, describe 0.988) less three binomial standard deviations of a
40-scene sample, rounded down to a hundredth: a correct checkpoint and code pass, and a broken one (wrong weights,
a decoding or processing bug, a box-conversion slip, the picture cropped) fails (the best fixed box grounds 0.036
of the scenes, random weights 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import evaluate_mini as ev  # noqa: E402

N_SCENES = 40
BARS = {
    "ground": 0.80,
    "caption_named": 0.80,
    "caption_boxes": 0.83,
    "describe": 0.93,
}  # measured on 500 scenes: see docs/miniature.md


@pytest.fixture(scope="module")
def measured():
    from kosmos2_ref.hub import resolve_checkpoint

    rows = ev.evaluate_scenes(resolve_checkpoint("mini"), list(range(N_SCENES)), with_transformers=False)
    return ev.summarise([r["ours"] for r in rows], ev.scenes_of(rows))


@pytest.mark.parametrize("key", list(BARS))
def test_accuracy_on_held_out_scenes(measured, key):
    print(f"\n  {key}: {measured[key]:.3f} on {N_SCENES} held-out scenes (bar {BARS[key]:.2f})")
    assert measured[key] >= BARS[key], f"{key}: {measured[key]:.3f} < bar {BARS[key]:.2f}"
