"""Image grids: one labelled row per class, every image enlarged by a whole factor and pixel-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medistill.data import MULTI_LABEL
from medistill.pictures import MIN_TILE, PAD, ROWS_KEY, render_grid, save_grid


def test_rows_follow_the_classes_and_images_are_enlarged_pixel_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pixels = torch.rand(5, 1, 28, 28)
    labels = torch.tensor([1, 0, 1, 1, 0])
    path = save_grid(pixels, labels, "binary-class", ["malignant", "normal, benign"], tmp_path / "grid.png", max_per_class=2)
    with Image.open(path) as image:
        assert image.mode == "L" and json.loads(image.text[ROWS_KEY]) == ["malignant", "normal, benign"]
        grid = np.asarray(image)
    scale = -(-MIN_TILE // 28)  # the smallest whole factor reaching MIN_TILE
    tile = 28 * scale
    assert grid.shape[0] == PAD + 2 * (tile + PAD)
    left = grid.shape[1] - 2 * (tile + PAD)  # two images per row at most, after the name column
    second_benign = grid[PAD + tile + PAD : PAD + 2 * tile + PAD, left + tile + PAD : left + 2 * tile + PAD]
    expected = (pixels[2, 0] * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(second_benign[::scale, ::scale], expected)
    np.testing.assert_array_equal(second_benign, np.kron(expected, np.ones((scale, scale), dtype=np.uint8)))


def test_a_class_without_images_gets_no_row_and_large_images_are_not_enlarged() -> None:
    pixels = torch.rand(2, 3, 128, 128)
    image, names = render_grid(pixels, torch.tensor([0, 2]), "multi-class", ["a", "b", "c"])
    assert names == ["a", "c"] and image.mode == "RGB"
    assert image.size[1] == PAD + 2 * (128 + PAD)


def test_multi_label_rows_are_numbered_chunks() -> None:
    image, names = render_grid(torch.rand(12, 1, 8, 8), torch.ones(12, 3), MULTI_LABEL, ["p", "q", "r"], max_per_class=5)
    assert names == ["images 1-5", "images 6-10", "images 11-12"]
    assert image.size[1] == PAD + 3 * (8 * (-(-MIN_TILE // 8)) + PAD)
