#!/usr/bin/env python
"""Build the documentation site strictly and open it in a real browser.

    python docs/check_site.py                # mkdocs build --strict, then Chromium on the home page and a lesson
    python docs/check_site.py --no-browser   # the strict build only

The site is written to ``build/site/``; the screenshots to ``build/site-screenshots/`` (neither is committed).
The browser check serves ``build/site`` on 127.0.0.1 with the standard library's HTTP server, loads each page in
headless Chromium (Debian's ``chromium`` package), and fails if any request the page made got an error status
(a missing image, stylesheet or script) or if a page shows no image at all.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site"
SHOTS = ROOT / "build" / "site-screenshots"
PAGES = {"home": "index.html", "lesson": "lessons/01_images_to_patches.html"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def build(site: Path = SITE) -> None:
    """``mkdocs build --strict``: any warning (a broken link, a missing page, a bad docstring) is an error."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # Material's end-of-life banner
    if proc.returncode != 0:
        raise SystemExit(f"mkdocs build --strict failed:\n{proc.stdout}{proc.stderr}")


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site and records (path, status) of every request."""

    log: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.log.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, *args):
        pass


def serve(site: Path):
    """A server for ``site`` on a free port of 127.0.0.1, in a thread; returns (server, request log)."""
    log: list[tuple[str, int]] = []
    handler = functools.partial(type("Handler", (_LoggingHandler,), {"log": log}), directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, log


def find_browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: install Debian's chromium package (scripts/setup_dev.sh does)")


def screenshot(browser: str, url: str, out: Path) -> None:
    """Headless Chromium loads ``url`` (waiting for its images) and saves a 1280×1600 screenshot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        "--virtual-time-budget=5000",
        f"--screenshot={out}",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(out.parent)})
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"Chromium could not open {url}:\n{proc.stderr[-2000:]}")


def check_in_browser(site: Path = SITE, shots: Path = SHOTS) -> dict[str, list[tuple[str, int]]]:
    """Open each page of PAGES; return the requests each made. Raises SystemExit on an error status."""
    browser = find_browser()
    server, log = serve(site)
    seen = {}
    try:
        for name, page in PAGES.items():
            start = len(log)
            url = f"http://127.0.0.1:{server.server_address[1]}/{page}"
            screenshot(browser, url, shots / f"{name}.png")
            seen[name] = log[start:]
    finally:
        server.shutdown()
    for name, requests in seen.items():
        failed = [(p, s) for p, s in requests if s >= 400 and not p.endswith("favicon.ico")]
        if failed:
            raise SystemExit(f"{PAGES[name]}: requests that failed: {failed}")
        if not any(p.split("?")[0].endswith(".png") for p, _ in requests):
            raise SystemExit(f"{PAGES[name]}: the page loaded no image")
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-browser", action="store_true", help="only build the site strictly")
    args = ap.parse_args(argv)
    build()
    print(f"built {SITE.relative_to(ROOT)} (strict)")
    if not args.no_browser:
        for name, requests in check_in_browser().items():
            images = sum(p.split("?")[0].endswith(".png") for p, _ in requests)
            print(
                f"{PAGES[name]}: {len(requests)} requests, {images} images, none failed; "
                f"screenshot {(SHOTS / (name + '.png')).relative_to(ROOT)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
