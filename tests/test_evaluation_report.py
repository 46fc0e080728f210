import json

import numpy as np
import pytest
from PIL import Image

from distill.evaluation_report import pick_examples, write_report
from distill.metrics import pixel_auroc

NAMES = ["roc_image.png", "roc_pixel.png", "worst.png", "best.png", "summary.json"]


def _data(rng: np.random.Generator, n: int = 12, size: int = 32, rgb: bool = False):
    labels = np.array([0, 1] * (n // 2))
    masks = np.zeros((n, size, size), dtype=bool)
    masks[labels == 1, 8:16, 10:20] = True
    maps = (rng.random((n, size, size)) + masks).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1) + rng.normal(0, 0.3, n)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    return scores, labels, maps, masks, images


@pytest.mark.parametrize("rgb", [False, True])
def test_write_report_creates_readable_pngs(tmp_path, rgb):
    scores, labels, maps, masks, images = _data(np.random.default_rng(0), rgb=rgb)
    out = tmp_path / "report"
    paths = write_report(
        out, scores=scores, labels=labels, maps=maps, masks=masks, images=images,
        threshold=float(np.median(scores)), n_examples=4,
    )  # fmt: skip
    assert [p.name for p in paths] == NAMES
    for p in paths[:-1]:
        assert p.parent == out and p.stat().st_size > 1000
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
    # Four example rows make the grid taller than a single ROC plot.
    with Image.open(out / "worst.png") as worst, Image.open(out / "roc_image.png") as roc:
        assert worst.size[1] > roc.size[1]


def test_write_report_without_defect_pixels_still_writes_every_file(tmp_path):
    scores, labels, maps, masks, images = _data(np.random.default_rng(1))
    paths = write_report(
        tmp_path, scores=scores, labels=labels, maps=maps, masks=np.zeros_like(masks),
        images=images,
    )  # fmt: skip
    assert all(p.stat().st_size > 0 for p in paths)


def test_pick_examples_worst_and_best():
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1])
    # Worst: highest-scoring good (0.9, 0.5), then lowest-scoring defective (0.2, 0.7).
    assert pick_examples(scores, labels, 4, worst=True) == [0, 2, 3, 5]
    # Best: lowest-scoring good (0.1, 0.5), then highest-scoring defective (0.8, 0.7).
    assert pick_examples(scores, labels, 4, worst=False) == [1, 2, 4, 5]
    # A class short of tiles leaves its slots to the other.
    assert pick_examples(scores, np.array([0, 0, 0, 0, 0, 1]), 4, worst=True) == [0, 4, 2, 5]


def test_write_report_rejects_mismatched_shapes(tmp_path):
    scores, labels, maps, masks, images = _data(np.random.default_rng(2))
    with pytest.raises(ValueError, match="images"):
        write_report(
            tmp_path, scores=scores, labels=labels, maps=maps, masks=masks,
            images=images[:, :8],
        )  # fmt: skip


def test_the_report_counts_no_pixel_off_the_fabric(tmp_path):
    """As `rollscan evaluate`'s JSON: a table beside the fabric that scores high everywhere
    moves neither the report's pixel AUROC nor its curve."""
    scores, labels, maps, masks, images = _data(np.random.default_rng(2))
    valid = np.ones_like(masks)
    valid[:, :, 26:] = False  # the table: the last 6 columns of every tile
    maps[:, :, 26:] = 5.0  # scored above every flaw
    write_report(tmp_path, scores=scores, labels=labels, maps=maps, masks=masks, images=images,
                 valid=valid)  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pixels_off_fabric"] == 12 * 32 * 6
    assert summary["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks, valid=valid), abs=1e-6)
    assert summary["pixel_auroc"] > 0.9 > pixel_auroc(maps, masks)  # the table counted: < 0.9
