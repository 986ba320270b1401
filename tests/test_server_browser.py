"""The web page in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright, against the real
server on 127.0.0.1 with the demo checkpoint (random weights).

What random weights allow: the words are noise and the model seldom writes a box by itself. So the test that must
see a box uses a prompt that already holds a grounded phrase (the box comes from the prompt, and the page must
draw it), and the others compare what the page shows with what the API answers for the same request (greedy
decoding is deterministic), never with words written down here.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from web_server import SAMPLE, running_server

from kosmos2_ref.draw import colourise

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra: pip install -e '.[dev]'")
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no Chromium: install Debian's chromium package (scripts/setup_dev.sh does)", allow_module_level=True)

GROUNDED_PROMPT = "<grounding> An image of<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from kosmos2_ref.demo import demo_checkpoint

    with running_server(demo_checkpoint(tmp_path_factory.mktemp("demo_cache")), "--quiet") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The page, loaded, with the sample photo uploaded through the file input; fails on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    page.set_input_files("#file", str(SAMPLE))
    wait_done(page, "uploading")
    yield page
    context.close()
    assert not errors, errors


def wait_done(page, label: str) -> None:
    page.wait_for_function(
        "(label) => document.body.dataset.done === label || (document.body.dataset.done || '').endsWith('failed')",
        arg=label,
    )
    assert page.get_attribute("body", "data-done") == label, page.inner_text("#status")


def api_caption(server, image_id: str, prompt: str, max_new_tokens: int) -> dict:
    status, result = server.json(
        "POST", "/api/caption", {"image_id": image_id, "prompt": prompt, "max_new_tokens": max_new_tokens}
    )
    assert status == 200, result
    return result


def image_id(page) -> str:
    return page.get_attribute("#stage", "data-image-id")


def test_caption_streams_and_draws_the_box_of_a_grounded_phrase(page, server):
    page.fill("#prompt", GROUNDED_PROMPT)
    page.fill("#max-new", "10")
    page.click("#caption-btn")
    wait_done(page, "captioning")
    boxes = page.locator("#boxes .box")
    assert boxes.count() >= 1
    assert "a dog" in boxes.first.inner_text()
    assert page.locator("#caption-text mark").first.inner_text() == "a dog"  # highlighted in its box's colour
    expected = api_caption(server, image_id(page), GROUNDED_PROMPT, 10)
    generated_rows = page.locator("#tokens tr.generated")
    assert generated_rows.count() == len(expected["generated_tokens"])
    assert int(page.get_attribute("body", "data-streamed-tokens")) == len(expected["generated_tokens"])
    assert page.inner_text("#caption-text") == expected["caption"]
    # the box lies where the API says, as a share of the image
    photo, box = page.locator("#photo").bounding_box(), boxes.first.bounding_box()
    x1, y1, x2, y2 = expected["entities"][0]["boxes"][0]
    assert abs((box["x"] - photo["x"]) / photo["width"] - x1) < 0.01
    assert abs((box["y"] + box["height"] - photo["y"]) / photo["height"] - y2) < 0.01
    # the raw view names the grounding tags
    tokens = page.inner_text("#tokens")
    for tag in ("<phrase>", "</phrase>", "<object>", "<patch_index_0044>", "<patch_index_0863>", "</object>"):
        assert tag in tokens


def test_caption_of_the_default_prompt_shows_what_the_api_answers(page, server):
    page.fill("#max-new", "12")
    page.click("#caption-btn")
    wait_done(page, "captioning")
    expected = api_caption(server, image_id(page), "<grounding> An image of", 12)
    assert page.inner_text("#caption-text") == expected["caption"]
    assert page.locator("#boxes .box").count() == sum(len(e["boxes"]) for e in expected["entities"])
    print(f"\nrandom-weight caption: {expected['caption'][:80]!r}, {len(expected['entities'])} entities")


def test_dragging_a_box_describes_it(page):
    photo = page.locator("#photo").bounding_box()
    x0, y0 = photo["x"] + 0.2 * photo["width"], photo["y"] + 0.25 * photo["height"]
    x1, y1 = photo["x"] + 0.6 * photo["width"], photo["y"] + 0.75 * photo["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()
    wait_done(page, "describing")
    assert page.inner_text("#describe-result").startswith("It")
    drawn = page.locator("#boxes .box.described").bounding_box()
    assert abs(drawn["x"] - x0) < 3 and abs(drawn["y"] - y0) < 3  # the box drawn is the box dragged
    assert abs(drawn["x"] + drawn["width"] - x1) < 3


def test_a_latent_query_heat_map_is_its_attention(page, server):
    page.click("#queries button >> text='5'")
    wait_done(page, "reading the connector")
    assert page.get_attribute("#heat", "data-query") == "5"
    assert page.is_visible("#heat")
    pixels = np.asarray(
        page.evaluate("""() => {
        const c = document.getElementById('heat');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"""),
        np.int64,
    )
    status, attention = server.json("GET", f"/api/attention?image_id={image_id(page)}")
    w = np.asarray(attention["weights"][5])
    expected = colourise((w - w.min()) / (w.max() - w.min()))  # draw.py's ramp, min-max scaled
    assert np.abs(pixels.reshape(-1, 4)[:, :3] - expected).max() <= 1


def test_hovering_a_patch_shows_the_query_that_looks_at_it_most(page, server):
    page.check("#connector-toggle")
    photo = page.locator("#photo").bounding_box()
    page.mouse.move(photo["x"] + 0.3 * photo["width"], photo["y"] + 0.6 * photo["height"])  # patch (9, 4)
    page.wait_for_function("document.getElementById('hover-info').textContent.includes('latent query')")
    status, attention = server.json("GET", f"/api/attention?image_id={image_id(page)}")
    best = int(np.argmax(np.asarray(attention["weights"])[:, 9 * 16 + 4]))
    assert f"patch (9, 4): latent query {best} " in page.inner_text("#hover-info")
    assert page.get_attribute("#heat", "data-query") == str(best)


def test_ground_and_the_location_grid(page):
    page.fill("#ground-phrase", "a dog")
    page.click("#ground-btn")
    wait_done(page, "grounding")
    assert "a dog" in page.inner_text("#ground-result")
    page.check("#grid-toggle")
    assert page.is_visible("#grid")
    photo = page.locator("#photo").bounding_box()
    page.mouse.move(photo["x"] + 0.5 * photo["width"] + 1, photo["y"] + 1)
    assert "<patch_index_0016>" in page.inner_text("#hover-info")  # row 0, column 16


def test_an_image_dropped_on_the_page_is_uploaded(page):
    """A drop carries a File in its DataTransfer, as a file dragged from the desktop does."""
    before = image_id(page)
    page.evaluate("""async () => {
        const blob = await (await fetch('/samples/two_dogs.jpg')).blob();
        const small = await createImageBitmap(blob, { resizeWidth: 120, resizeHeight: 60 });
        const canvas = new OffscreenCanvas(120, 60);
        canvas.getContext('2d').drawImage(small, 0, 0);
        const file = new File([await canvas.convertToBlob({ type: 'image/png' })], 'dropped.png');
        const data = new DataTransfer();
        data.items.add(file);
        document.getElementById('stage').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true }));
    }""")
    wait_done(page, "uploading")
    assert image_id(page) != before
    assert page.evaluate("document.getElementById('photo').naturalWidth") == 120


def test_an_upload_that_is_no_image_is_reported_and_the_page_goes_on(page, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("not an image, whatever the name says")
    page.set_input_files("#file", str(fake))
    page.wait_for_function("(document.body.dataset.done || '').endsWith('failed')")
    assert "not an image" in page.inner_text("#status")
    page.click("#sample-btn")  # the page still works
    wait_done(page, "uploading")
    assert page.get_attribute("#stage", "data-image-id")


def test_a_generated_scene_is_shown_and_uploaded(page):
    page.click("#scene-btn")
    wait_done(page, "uploading")
    image_id = page.get_attribute("#stage", "data-image-id")
    assert image_id
    size = page.evaluate(
        "(() => { const i = document.querySelector('#stage img'); "
        "return i ? [i.naturalWidth, i.naturalHeight] : null; })()"
    )
    assert size is not None and size[0] > 0 and size[0] == size[1], size  # the world's scenes are square


def test_the_readme_screenshot_script_runs(tmp_path):
    """docs/screenshot_page.py (the README's picture) on the demo checkpoint, into a temporary file."""
    import subprocess
    import sys

    import PIL.Image
    from web_server import REPO

    from kosmos2_ref.demo import demo_checkpoint

    out = tmp_path / "page.png"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "docs" / "screenshot_page.py"),
            "--model",
            str(demo_checkpoint(tmp_path / "cache")),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "random weights" in done.stdout
    assert PIL.Image.open(out).size == (1280, 960)
