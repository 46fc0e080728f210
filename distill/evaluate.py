"""Evaluation of a checkpoint on one MVTec-layout category: tile and pixel metrics, speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from distill.checkpoint import load_detector
from distill.data.mvtec import Category, load_mask, load_stack
from distill.inference import Detector, Precision
from distill.metrics import aupro, coverage, f1_max, image_auroc, pixel_auroc

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "coverage", "tiles_per_s")


def predict_with_progress(
    detector: Detector, images: np.ndarray, progress: bool = True
) -> tuple[np.ndarray, float]:
    """Maps for all images, showing a progress bar; returns (maps, seconds of model + map)."""
    maps, seconds = [], 0.0
    with tqdm(total=len(images), desc="score", unit="tile", disable=not progress) as bar:
        for start in range(0, len(images), detector.batch_size):
            prediction = detector.predict(images[start : start + detector.batch_size])
            maps.append(prediction.maps)
            seconds += prediction.seconds
            bar.update(len(prediction.maps))
    return np.concatenate(maps), seconds


def evaluate_detector(
    detector: Detector,
    data: str | Path,
    tile: int,
    *,
    report_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    category = Category.open(data)
    samples = category.test
    labels = np.array([s.label for s in samples])
    if len(samples) == 0 or labels.min() == labels.max():
        raise ValueError(f"{data}/test needs both good and defective images to evaluate")
    images = load_stack([s.path for s in samples], tile)
    masks = np.stack([load_mask(s.mask_path, (tile, tile)) for s in samples])
    maps, seconds = predict_with_progress(detector, images, progress)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    has_masks = bool(masks.any())
    result: dict[str, float | int] = {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks) if has_masks else float("nan"),
        "aupro": aupro(maps, masks) if has_masks else float("nan"),
        "f1_max": f1_max(scores, labels),
        "coverage": coverage(scores, labels),
        "tiles_per_s": len(images) / seconds,
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
    }
    if report_dir is not None:
        from distill.report import write_report

        write_report(
            report_dir,
            scores=scores,
            labels=labels,
            maps=maps,
            masks=masks,
            images=images[..., 0] if images.shape[-1] == 1 else images,
            threshold=detector.threshold,
        )
    return result


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    device: str = "cpu",
    precision: Precision = "auto",
    batch_size: int = 16,
    teacher_weights: str | None = None,
    report_dir: str | Path | None = None,
    json_out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    detector, card = load_detector(
        model,
        teacher_weights=teacher_weights,
        device=device,
        precision=precision,
        batch_size=batch_size,
    )
    result = evaluate_detector(detector, data, card.tile, report_dir=report_dir, progress=progress)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(rows: dict[str, dict[str, float | int]]) -> str:
    """A plain-text table: one row per named result, the metric columns of METRIC_KEYS."""
    header = f"{'':<16}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
    lines = [header, "-" * len(header)]
    for name, result in rows.items():
        cells = "".join(
            f"{result[k]:>13.1f}" if k == "tiles_per_s" else f"{result[k]:>13.3f}"
            for k in METRIC_KEYS
        )
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)
