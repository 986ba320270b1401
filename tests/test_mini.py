"""The packaged miniature by name: ``Kosmos2.from_pretrained("mini")``, its processor, its tasks, its errors."""

from __future__ import annotations

import json
import shutil

import pytest

from kosmos2_ref import Kosmos2, Kosmos2Processor, hub, tasks, world


def test_mini_loads_by_name_with_its_processor():
    model = Kosmos2.from_pretrained("mini")
    assert model.folder == hub.MINI_FOLDER and hub.is_miniature(model.folder)
    info = json.loads((hub.MINI_FOLDER / "mini.json").read_text())
    assert "synthetic shapes" in info["what"] and info["parameters"] == model.num_parameters()
    processor = Kosmos2Processor.from_pretrained("mini")
    assert processor.image_processor_config.crop_size == {"height": 112, "width": 112}
    assert model.config.vision_config.image_size == 112
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == 1281


def test_the_three_jobs_run_on_a_scene():
    model = Kosmos2.from_pretrained("mini")
    scene = world.make_scene(1_500_000_001)
    image = world.render(scene)
    cap = tasks.caption(model, image)
    assert cap.text.startswith("<grounding> An image of")
    gr = tasks.ground(model, image, world.referring_examples(scene)[0][0])
    assert gr.text.startswith("<grounding><phrase> the ")
    de = tasks.describe(model, image, scene.objects[0].box)
    assert de.description.startswith("It is")


def test_an_incomplete_miniature_is_named(tmp_path, monkeypatch):
    """A broken installation (weights missing) says which folder lacks what, as a ValueError."""
    broken = tmp_path / "mini"
    shutil.copytree(hub.MINI_FOLDER, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    monkeypatch.setattr(hub, "MINI_FOLDER", broken)
    with pytest.raises(ValueError, match=r"miniature model 'mini' is incomplete.*model\.safetensors"):
        Kosmos2.from_pretrained("mini")


def test_a_local_folder_called_mini_needs_a_path(tmp_path, monkeypatch):
    """The name "mini" always means the packaged model; ./mini is a folder."""
    (tmp_path / "mini").mkdir()
    monkeypatch.chdir(tmp_path)
    assert Kosmos2.from_pretrained("mini").folder == hub.MINI_FOLDER
    with pytest.raises(ValueError, match="no config.json"):
        Kosmos2.from_pretrained("./mini")
