"""Evaluation of a checkpoint on one MVTec-layout category: tile and pixel metrics, speed.

Besides AUROC, the figures of the model's operating point: at its calibrated threshold, the
share of good test tiles flagged (`fpr_at_threshold`, to compare with the calibration's target)
and of defective ones caught (`recall_at_threshold`). A category with good test tiles only still
evaluates: AUROC is then absent and the false-alarm share is what it measures. With a memory
bank, each map is reported on its own too (`scorers`: the student, the memory bank, the fusion).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from distill.anomaly_map import MapFusion
from distill.checkpoint import load_detector
from distill.data.mvtec import Category, check_native_size, load_mask, load_stack
from distill.inference import Detector, Precision
from distill.metrics import aupro, coverage, f1_max, image_auroc, pixel_auroc, tile_scores_on
from distill.progress import progress_bar
from distill.selection import fuse_maps, raw_maps


class UnmaskedDefectWarning(UserWarning):
    """Defect test tiles without a mask: the pixel figures count their pixels as good."""


METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "coverage", "tiles_per_s")
NAN = float("nan")


def predict_with_progress(
    detector: Detector, images: np.ndarray, progress: bool = True, fabric: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Maps for all images (`fabric`: where the fabric lies in them, None: everywhere), showing
    a progress bar; returns (maps, seconds of model + map)."""
    maps, seconds = [], 0.0
    with progress_bar(total=len(images), desc="score", unit="tile", disable=not progress) as bar:
        for start in range(0, len(images), detector.batch_size):
            stop = start + detector.batch_size
            on = None if fabric is None else fabric[start:stop]
            prediction = detector.predict(images[start:stop], fabric=on)
            maps.append(prediction.maps)
            seconds += prediction.seconds
            bar.update(len(prediction.maps))
    return np.concatenate(maps), seconds


def map_metrics(
    maps: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    threshold: float | None = None,
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """Tile and pixel figures of one set of maps, on the `valid` (fabric) pixels only; the
    AUROC family is NaN without both classes."""
    scores = tile_scores_on(maps, valid)
    good, bad = labels == 0, labels == 1
    both = bool(good.any() and bad.any())
    has_masks = bool((masks if valid is None else masks & valid).any())
    result = {
        "image_auroc": image_auroc(scores, labels) if both else NAN,
        "pixel_auroc": pixel_auroc(maps, masks, valid=valid) if has_masks and both else NAN,
        "aupro": aupro(maps, masks, valid=valid) if has_masks else NAN,
        "f1_max": f1_max(scores, labels) if both else NAN,
        "coverage": coverage(scores, labels) if both else NAN,
    }
    if threshold is not None:
        flagged = scores > threshold
        result["fpr_at_threshold"] = float(flagged[good].mean()) if good.any() else NAN
        result["recall_at_threshold"] = float(flagged[bad].mean()) if bad.any() else NAN
    return result


def _scorer_views(detector: Detector, student_trained: bool) -> dict[str, MapFusion]:
    """The maps worth reporting on their own, by name: each side of the fusion, and the fusion
    (the student's only when it was trained: `--scorer memory` trains none)."""
    fusion = detector.model.fusion
    if detector.model.memory is None:
        return {}
    views = {
        "student": MapFusion(1.0, fusion.student_stats, fusion.memory_stats),
        "memory": MapFusion(0.0, fusion.student_stats, fusion.memory_stats),
    }
    if not student_trained:
        del views["student"]
    if 0 < fusion.weight < 1:
        views[f"fused {fusion.weight:g}"] = fusion
    return views


def evaluate_detector(
    detector: Detector,
    data: str | Path,
    tile: int,
    *,
    report_dir: str | Path | None = None,
    progress: bool = True,
    student_trained: bool = True,
    native_size: bool = False,
) -> dict:
    """The detector's figures on `data`'s test tiles (loaded at `tile` px: `native_size` refuses
    tiles of another size, as training does unless a model was trained with --resize)."""
    category = Category.open(data)
    samples = category.test
    if not samples:
        raise ValueError(f"{data}/test holds no images to evaluate")
    paths = [s.path for s in samples]
    if native_size:
        check_native_size(paths, tile, evaluating=True)
    unmasked = [s.path for s in samples if s.label == 1 and s.mask_path is None]
    if unmasked:  # their pixels would count as good ones, silently lowering the pixel figures
        warnings.warn(
            f"{len(unmasked)} defect tile(s) have no mask (ground_truth/KIND/NAME_mask.png), "
            f"e.g. {unmasked[0]}: the pixel metrics take all their pixels for good ones",
            UnmaskedDefectWarning,
            stacklevel=2,
        )
    labels = np.array([s.label for s in samples])
    images = load_stack(paths, tile)
    masks = np.stack([load_mask(s.mask_path, (tile, tile)) for s in samples])
    valid = category.valid_masks(paths, tile)
    maps, seconds = predict_with_progress(detector, images, progress, fabric=valid)
    result: dict = map_metrics(maps, labels, masks, detector.threshold, valid)
    result |= {
        "tiles_per_s": len(images) / seconds,
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "fusion_weight": detector.model.fusion.weight,
    }
    views = _scorer_views(detector, student_trained)
    if list(views) == ["memory"]:  # the bank's map alone is the model's own: no second pass
        result["scorers"] = {"memory": map_metrics(maps, labels, masks, valid=valid)}
    elif views:
        raw = raw_maps(
            detector.model, images, detector.mean, detector.std, detector.batch_size, fabric=valid
        )
        result["scorers"] = {
            name: map_metrics(fuse_maps(view, raw), labels, masks, valid=valid)
            for name, view in views.items()
        }
    if report_dir is not None:
        from distill.evaluation_report import write_report

        write_report(
            report_dir,
            scores=tile_scores_on(maps, valid),
            labels=labels,
            maps=maps,
            masks=masks,
            images=images[..., 0] if images.shape[-1] == 1 else images,
            threshold=detector.threshold,
            valid=valid,
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
) -> dict:
    """`model`'s figures on `data`'s test tiles (see `evaluate_detector`), the JSON and the
    report written where asked. Where they would go is checked first: a folder given for the
    JSON, or a file for the report, failed only after the whole evaluation, its figures lost."""
    _check_outputs(report_dir, json_out)
    detector, card = load_detector(
        model,
        teacher_weights=teacher_weights,
        device=device,
        precision=precision,
        batch_size=batch_size,
    )
    result = evaluate_detector(
        detector, data, card.tile, report_dir=report_dir, progress=progress,
        student_trained=card.metrics.get("epochs", 1) > 0,
        # a checkpoint from before `resize` was recorded: not known, not refused
        native_size=not card.train_config.get("resize", True),
    )  # fmt: skip
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_defined(result), indent=2, allow_nan=False)
        Path(json_out).write_text(text + "\n")
    return result


def _check_outputs(report_dir: str | Path | None, json_out: str | Path | None) -> None:
    if json_out is not None:
        target = Path(json_out)
        if target.is_dir():
            raise ValueError(f"--json {target} is a folder: give the file to write")
        if any(p.exists() and not p.is_dir() for p in target.parents):
            raise ValueError(f"--json {target}: a file stands where its folder would be")
    if report_dir is not None:
        folder = Path(report_dir)
        if any(p.exists() and not p.is_dir() for p in (folder, *folder.parents)):
            raise ValueError(f"--report {folder}: a file stands where its folder would be")


def _defined(value: object) -> object:
    """`value` without its NaN figures (an AUROC of good tiles only: the key left out, None in a
    list): NaN is not JSON, and a dashboard's parser refuses the whole file for it."""

    def nan(v: object) -> bool:
        return isinstance(v, float) and math.isnan(v)

    if isinstance(value, dict):
        return {k: _defined(v) for k, v in value.items() if not nan(v)}
    if isinstance(value, list | tuple):
        return [None if nan(v) else _defined(v) for v in value]
    return value


def _cell(value: float, key: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return f"{'–':>13}"
    return f"{value:>13.1f}" if key == "tiles_per_s" else f"{value:>13.3f}"


def format_table(rows: dict[str, dict], keys: tuple[str, ...] = METRIC_KEYS) -> str:
    """A plain-text table: one row per named result (and one per scorer it reports)."""
    header = f"{'':<22}" + "".join(f"{k:>13}" for k in keys)
    lines = [header, "-" * len(header)]
    for name, result in rows.items():
        lines.append(f"{name:<22}" + "".join(_cell(result.get(k, NAN), k) for k in keys))
        for scorer, figures in result.get("scorers", {}).items():
            cells = "".join(_cell(figures.get(k, NAN), k) for k in keys)
            lines.append(f"{'  ' + scorer:<22}{cells}")
    return "\n".join(lines)
