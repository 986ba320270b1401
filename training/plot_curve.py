"""Draw the learning curve of a training run with Pillow (dev tool): losses and held-out IoU over training time.

    python training/plot_curve.py training/log_mini.jsonl docs/figures/mini_curve.png

Left: the cross-entropy of the text tokens and of the location tokens (hard targets), log scale. Right: the
held-out greedy referring accuracy (IoU >= 0.5) and mean IoU, measured every 100 steps during training (on 64
scenes of 1-4 objects, and on 32 single-object scenes). A dashed line marks where a second stage restarted the
learning rate.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 1100, 420
PANEL = (70, 40, 500, 340)  # x0, y0, width, height of the left panel
GAP = 560
COLOURS = {
    "text": (40, 90, 200),
    "loc": (210, 60, 40),
    "ground_acc": (30, 150, 70),
    "ground_miou": (150, 80, 190),
    "ground1_acc": (230, 150, 20),
}
LABELS = {
    "text": "text tokens",
    "loc": "location tokens (hard target)",
    "ground_acc": "IoU >= 0.5, 64 scenes of 1-4 objects",
    "ground_miou": "mean IoU, same scenes",
    "ground1_acc": "IoU >= 0.5, 32 single-object scenes",
}


def font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def restarts(rows) -> list[float]:
    """Training minutes where a later stage restarted the learning rate (``--init-from`` with a longer schedule):
    where it rises past the warm-up."""
    return [b["minutes"] for a, b in zip(rows, rows[1:]) if b["step"] > 200 and b.get("lr", 0) > 1.2 * a.get("lr", 0)]


def panel(d, x0, title, rows, keys, ylog, ymin, ymax, xmax, marks=()):
    y0, w, h = PANEL[1], PANEL[2], PANEL[3]
    d.rectangle((x0, y0, x0 + w, y0 + h), outline=(120, 120, 120))
    d.text((x0, 10), title, fill=(0, 0, 0), font=font(16))

    def fy(v):
        if ylog:
            v = max(v, ymin)
            return y0 + h - (math.log(v) - math.log(ymin)) / (math.log(ymax) - math.log(ymin)) * h
        return y0 + h - (v - ymin) / (ymax - ymin) * h

    def fx(m):
        return x0 + m / xmax * w

    ticks = [0.01, 0.03, 0.1, 0.3, 1, 3, 10] if ylog else [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for t in ticks:
        if ymin <= t <= ymax:
            d.line((x0, fy(t), x0 + w, fy(t)), fill=(230, 230, 230))
            d.text((x0 - 45, fy(t) - 7), f"{t:g}", fill=(60, 60, 60), font=font(12))
    step = 20 if xmax > 60 else 10
    for m in range(0, int(xmax) + 1, step):
        d.text((fx(m) - 8, y0 + h + 6), str(m), fill=(60, 60, 60), font=font(12))
    d.text((x0 + w / 2 - 60, y0 + h + 24), "training minutes", fill=(0, 0, 0), font=font(13))
    for m in marks:  # a new stage: dashed line
        for y in range(int(y0), int(y0 + h), 8):
            d.line((fx(m), y, fx(m), y + 4), fill=(150, 150, 150))
        d.text((fx(m) + 4, y0 + h - 18), "stage 2", fill=(110, 110, 110), font=font(12))
    for i, key in enumerate(keys):
        pts = [(fx(r["minutes"]), fy(r[key])) for r in rows if key in r]
        if len(pts) > 1:
            d.line(pts, fill=COLOURS[key], width=2)
        d.text((x0 + 10, y0 + 8 + 18 * i), LABELS[key], fill=COLOURS[key], font=font(13))


def main(log: str, out: str) -> None:
    by_step = {}
    for line in Path(log).read_text().splitlines():  # a resumed run repeats the steps after its last
        if line.strip():  # checkpoint: the later row of a step wins
            row = json.loads(line)
            by_step[row["step"]] = row
    rows = [by_step[s] for s in sorted(by_step)]
    xmax = max(r["minutes"] for r in rows)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    train = [r for r in rows if "text" in r]
    marks = restarts(rows)
    panel(d, PANEL[0], "training loss (nats per token)", train, ["text", "loc"], True, 0.01, 10, xmax, marks)
    panel(
        d,
        PANEL[0] + GAP,
        "held-out referring (greedy)",
        rows,
        ["ground_acc", "ground_miou", "ground1_acc"],
        False,
        0,
        1,
        xmax,
        marks,
    )
    img.save(out)
    print(f"{out}: {len(rows)} log rows, {xmax:.0f} minutes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
