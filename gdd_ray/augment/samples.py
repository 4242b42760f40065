"""OUT/samples.png: one row per class, each generated image followed by its augmented variants."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from gdd_ray import shards
from gdd_ray.classes import ClassInfo
from gdd_ray.run import RunDir

MAX_CLASSES = 10
IMAGES_PER_CLASS = 2
CELL = 64  # 32 px CIFAR images are unreadable at 1:1; cells are upscaled (nearest) to at least this
LABEL_WIDTH = 110
GAP = 8


def grid_image(rows: list[tuple[str, list[list[np.ndarray]]]]) -> Image.Image:
    """rows: (caption, [[original, variant 1, ...] per image]) -> one RGB image."""
    per_image = max(len(group) for _, groups in rows for group in groups)
    groups_per_row = max(len(groups) for _, groups in rows)
    h, w = rows[0][1][0][0].shape[:2]
    scale = max(1, -(-CELL // max(h, w)))
    ch, cw = h * scale, w * scale
    width = LABEL_WIDTH + groups_per_row * (per_image * (cw + 2) + GAP)
    height = len(rows) * (ch + 4) + 18
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), "class", fill="black")
    for g in range(groups_per_row):
        for v in range(per_image):
            x = LABEL_WIDTH + g * (per_image * (cw + 2) + GAP) + v * (cw + 2) + 2
            draw.text((x, 2), "orig" if v == 0 else f"v{v}", fill="black")
    for r, (caption, groups) in enumerate(rows):
        y = 18 + r * (ch + 4)
        draw.text((4, y + ch // 2 - 6), caption[:18], fill="black")
        for g, group in enumerate(groups):
            x0 = LABEL_WIDTH + g * (per_image * (cw + 2) + GAP)
            for v, px in enumerate(group):
                tile = Image.fromarray(px).resize((cw, ch), Image.NEAREST)
                canvas.paste(tile, (x0 + v * (cw + 2), y))
    return canvas


def write_sample_grid(
    run_dir: RunDir, classes: list[ClassInfo], names: list[str], variants: int, file: str = "samples.png"
) -> str:
    """Draw the first images of the first classes from OUT/augmented and write OUT/<file>."""
    labels = [c.label for c in classes[:MAX_CLASSES]]
    k1 = variants + 1
    table = shards.first_rows(
        run_dir.augmented, names, len(classes), labels, IMAGES_PER_CLASS * k1, ["image", "index", "variant"]
    )
    table = table.sort_by([("label", "ascending"), ("index", "ascending"), ("variant", "ascending")])
    pngs, row_labels = shards.png_bytes(table), table.column("label").to_pylist()
    rows = []
    for c in classes[:MAX_CLASSES]:
        mine = [png for png, label in zip(pngs, row_labels) if label == c.label][: IMAGES_PER_CLASS * k1]
        groups = [[shards.decode_png(b) for b in mine[i : i + k1]] for i in range(0, len(mine), k1)]
        if groups:
            rows.append((c.name, groups))
    if not rows:
        return ""
    buf = io.BytesIO()
    grid_image(rows).save(buf, format="PNG")
    run_dir.root.write_bytes(file, buf.getvalue())
    return file
