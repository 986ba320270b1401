#!/usr/bin/env python
"""Take the README's picture of the web page: start ``kosmos2-ref serve``'s server, use the page in headless
Chromium (Debian's ``chromium``, through Playwright) and save ``docs/figures/web_page.png``.

    python docs/screenshot_page.py                  # the real weights if in the Hugging Face cache, else random
    python docs/screenshot_page.py --model FOLDER   # any checkpoint folder
    python docs/screenshot_page.py --out shot.png

What it does on the page, as a user would: upload the sample photo, show latent query 21's heat map, drag a box
over the left dog (describe), and caption. With the real weights the caption uses the default prompt. With the
random-weight demo checkpoint (whose words are noise and which draws no box of its own) it uses a prompt that
already grounds "two dogs", so the picture shows how a box, its label and its phrase are drawn; the page's banner
says the weights are random.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import threading
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

OUT = DOCS / "figures" / "web_page.png"
SAMPLE = ROOT / "kosmos2_ref" / "assets" / "two_dogs.jpg"
GROUNDED_PROMPT = (
    "<grounding> An image of<phrase> two dogs</phrase><object><patch_index_0072><patch_index_1016></object>"
)
VIEWPORT = {"width": 1280, "height": 960}
TIMEOUT_MS = 600_000


def load_model(name: str | None):
    """(model, random_weights): ``name``, else the real weights from the cache, else the demo checkpoint."""
    from kosmos2_ref import Kosmos2
    from kosmos2_ref.demo import demo_checkpoint, is_demo_checkpoint
    from kosmos2_ref.hub import DEFAULT_MODEL_ID, CheckpointNotFoundError, resolve_checkpoint

    if name is None:
        try:
            name = str(resolve_checkpoint(DEFAULT_MODEL_ID, local_files_only=True))
        except CheckpointNotFoundError:
            name = str(demo_checkpoint())
    model = Kosmos2.from_pretrained(name)
    return model, is_demo_checkpoint(model.folder)


def start_server(model, random_weights: bool):
    """The real server on a free port of 127.0.0.1, in a thread of this process."""
    from kosmos2_ref.server import Kosmos2Server
    from kosmos2_ref.service import ModelService

    httpd = Kosmos2Server(("127.0.0.1", 0), ModelService(model, random_weights=random_weights), quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def wait_done(page, label: str) -> None:
    page.wait_for_function(
        "(label) => document.body.dataset.done === label || (document.body.dataset.done || '').endsWith('failed')",
        arg=label,
    )
    if page.get_attribute("body", "data-done") != label:
        raise SystemExit(f"the page failed: {page.inner_text('#status')}")


def use_the_page(page, url: str, random_weights: bool) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.set_input_files("#file", str(SAMPLE))
    wait_done(page, "uploading")
    page.click("#queries button >> text='21'")
    wait_done(page, "reading the connector")
    photo = page.locator("#photo").bounding_box()
    at = lambda fx, fy: (photo["x"] + fx * photo["width"], photo["y"] + fy * photo["height"])  # noqa: E731
    page.mouse.move(*at(0.28, 0.12))
    page.mouse.down()
    page.mouse.move(*at(0.51, 0.97), steps=6)
    page.mouse.up()
    wait_done(page, "describing")
    if random_weights:
        page.fill("#prompt", GROUNDED_PROMPT)
    page.fill("#max-new", "24")
    page.click("#caption-btn")
    wait_done(page, "captioning")


def browser_path() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: install Debian's chromium package (scripts/setup_dev.sh does)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint folder (default: real weights if cached, else the random-weight demo checkpoint)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to save it (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    import PIL.Image
    from playwright.sync_api import sync_playwright

    model, random_weights = load_model(args.model)
    httpd = start_server(model, random_weights)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path())
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            use_the_page(page, httpd.url, random_weights)
            png = page.screenshot()
            browser.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    # 256 colours keep the file small; the page is mostly flat colour (the photo and heat map dither a little).
    PIL.Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"saved {args.out} ({args.out.stat().st_size // 1024} KB, {'random' if random_weights else 'real'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
