"""Image grids people can read: one row per class labelled with its name, small images enlarged.

MedMNIST images are 28x28; shown at that size a grid is a smudge. Each image is enlarged by a
whole factor (nearest neighbour, so every pixel stays a visible square) to at least `MIN_TILE`
pixels, and each row starts with its class name. The row names are also stored in the PNG's
text chunk `medistill:rows`, so tools can read what each row shows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from medistill.atomic import atomic_path
from medistill.data.dataset import MULTI_LABEL

MIN_TILE = 96  # smallest displayed image side in pixels
PAD = 4  # pixels between images and around the grid
FONT_SIZE = 16
MAX_NAME = 40  # characters of a class name shown at the start of its row
ROWS_KEY = "medistill:rows"


def grid_rows(
    pixels: torch.Tensor, labels: torch.Tensor, task: str, label_names: list[str], max_per_class: int = 10
) -> list[tuple[str, torch.Tensor]]:
    """(row name, images) pairs: one row per class with images (single-label), else rows of up to `max_per_class`."""
    if task == MULTI_LABEL:
        chunks = range(0, min(len(pixels), max_per_class * 10), max_per_class)
        rows = [(f"images {i + 1}-{min(i + max_per_class, len(pixels))}", pixels[i : i + max_per_class]) for i in chunks]
    else:
        labels = labels.cpu().reshape(-1)
        rows = [(name, pixels[labels == c][:max_per_class]) for c, name in enumerate(label_names)]
    return [(name, images) for name, images in rows if len(images)] or [("", pixels[:1])]


def render_grid(
    pixels: torch.Tensor, labels: torch.Tensor, task: str, label_names: list[str], max_per_class: int = 10
) -> tuple[Image.Image, list[str]]:
    """A labelled grid of images in [0, 1] (N, C, H, W), and the name of each row, top to bottom."""
    pixels = pixels.detach().cpu().clamp(0, 1)
    rows = grid_rows(pixels, labels, task, label_names, max_per_class)
    channels, height, width = pixels.shape[1:]
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    font = ImageFont.load_default(size=FONT_SIZE)
    names = [name[:MAX_NAME] for name, _ in rows]
    name_width = max((int(font.getlength(name)) for name in names), default=0)
    left = PAD + (name_width + 2 * PAD if name_width else 0)
    columns = max(len(images) for _, images in rows)
    mode = "L" if channels == 1 else "RGB"
    canvas = Image.new(mode, (left + columns * (tile_w + PAD), PAD + len(rows) * (tile_h + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (_name, images) in enumerate(rows):
        top = PAD + i * (tile_h + PAD)
        draw.text((PAD, top + tile_h // 2), names[i], fill="black", font=font, anchor="lm")
        for j, image in enumerate(images):
            array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(array[..., 0] if channels == 1 else array).convert(mode)
            canvas.paste(tile.resize((tile_w, tile_h), Image.Resampling.NEAREST), (left + j * (tile_w + PAD), top))
    return canvas, names


def save_grid(
    pixels: torch.Tensor, labels: torch.Tensor, task: str, label_names: list[str], path: str | Path, max_per_class: int = 10
) -> Path:
    """Write the labelled grid as a PNG (row names in its `medistill:rows` text chunk)."""
    path = Path(path)
    image, names = render_grid(pixels, labels, task, label_names, max_per_class)
    info = PngInfo()
    info.add_text(ROWS_KEY, json.dumps(names))
    with atomic_path(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)
    return path
