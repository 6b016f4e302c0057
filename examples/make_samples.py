"""Draw the sample images in examples/ (bar chart, geometry diagram, table), deterministically with Pillow.

The PNGs are committed; run this to re-create them (same Pillow version, same bytes):

    python examples/make_samples.py            # writes examples/*.png
    python examples/make_samples.py --out DIR

Each image carries a question with a known answer (see QUESTIONS), so a real QVQ model can be checked
by eye: the demo's tiny random model will of course answer nonsense.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent

QUESTIONS = {
    "bar_chart.png": (
        "Which fruit sold the most, and how many more than the least?",
        "Cherries; 64 - 18 = 46",
    ),
    "geometry.png": ("The legs of the right triangle are 6 and 8. How long is x?", "10"),
    "table.png": ("What is the total cost of the order?", "3 x 2.50 + 2 x 4.00 + 5 x 1.20 = 21.50"),
}


def _font(size: int):
    """Pillow's bundled scalable font (Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow without the size argument
        return ImageFont.load_default()


def _centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill="black") -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2 - top), text, font=font, fill=fill)


def bar_chart() -> Image.Image:
    """Five labelled bars with their values written above them."""
    data = [("Apples", 42), ("Bananas", 27), ("Cherries", 64), ("Dates", 18), ("Figs", 35)]
    w, h = 480, 320
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    title, label, small = _font(20), _font(14), _font(12)
    _centered(draw, (w / 2, 20), "Fruit sold this week (units)", title)
    x0, y0, x1, y1 = 50, 50, w - 20, h - 40  # plot area
    draw.line([(x0, y1), (x1, y1)], fill="black", width=2)
    draw.line([(x0, y0), (x0, y1)], fill="black", width=2)
    top = 70
    for tick in range(0, top + 1, 10):
        y = y1 - (y1 - y0) * tick / top
        draw.line([(x0 - 5, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
        _centered(draw, (x0 - 20, y), str(tick), small)
    colours = [(214, 69, 65), (241, 196, 15), (142, 68, 173), (160, 112, 64), (39, 174, 96)]
    slot = (x1 - x0) / len(data)
    for i, ((name, value), colour) in enumerate(zip(data, colours)):
        cx = x0 + slot * (i + 0.5)
        bar_top = y1 - (y1 - y0) * value / top
        draw.rectangle([cx - slot * 0.3, bar_top, cx + slot * 0.3, y1 - 1], fill=colour, outline="black")
        _centered(draw, (cx, bar_top - 10), str(value), label)
        _centered(draw, (cx, y1 + 14), name, label)
    return img


def geometry() -> Image.Image:
    """A right triangle with legs 6 and 8, hypotenuse x, and the right angle marked."""
    w, h = 400, 320
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font, big = _font(18), _font(22)
    a, b, c = (60, 260), (340, 260), (60, 50)  # right angle at a
    draw.polygon([a, b, c], outline="black", width=3)
    draw.rectangle([a[0], a[1] - 20, a[0] + 20, a[1]], outline="black", width=2)
    _centered(draw, ((a[0] + b[0]) / 2, a[1] + 20), "8", big)
    _centered(draw, (a[0] - 20, (a[1] + c[1]) / 2), "6", big)
    mx, my = (b[0] + c[0]) / 2, (b[1] + c[1]) / 2
    angle = math.atan2(b[1] - c[1], b[0] - c[0])
    _centered(draw, (mx + 18 * math.sin(angle), my - 18 * math.cos(angle)), "x", big)
    for point, name, dx, dy in ((a, "A", -14, 14), (b, "B", 14, 14), (c, "C", -14, -12)):
        _centered(draw, (point[0] + dx, point[1] + dy), name, font)
    return img


def table() -> Image.Image:
    """A small order table: item, quantity, unit price."""
    rows = [
        ("Item", "Qty", "Unit price"),
        ("Notebook", "3", "2.50"),
        ("Pen set", "2", "4.00"),
        ("Eraser", "5", "1.20"),
    ]
    col_w = [180, 80, 140]
    row_h = 40
    w, h = sum(col_w) + 20, row_h * len(rows) + 20
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    head, body = _font(18), _font(16)
    y = 10
    for r, row in enumerate(rows):
        x = 10
        fill = (220, 230, 242) if r == 0 else None
        for text, cw in zip(row, col_w):
            draw.rectangle([x, y, x + cw, y + row_h], outline="black", width=1, fill=fill)
            _centered(draw, (x + cw / 2, y + row_h / 2), text, head if r == 0 else body)
            x += cw
        y += row_h
    return img


SAMPLES = {"bar_chart.png": bar_chart, "geometry.png": geometry, "table.png": table}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: examples/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in SAMPLES.items():
        path = args.out / name
        draw().save(path, format="PNG", optimize=True)
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
