"""The memory bank's levers on real fabric without retraining: selection and test figures.

    python bench/bank_levers.py [--tiles runs/aitex/tiles] [--fabric 00 …] [--teacher NAME]
        [--lever base levels123 level-norm levels123-norm channel-std k3 bank16k zoom0.5
         shift4 map-median map-highpass …]
        [--levels 2 3] [--strength LOW HIGH] [--mask-margin PX] [--syn-kind pasted|warped]
        [--threads N] [--json OUT]

Per fabric (tiles from `rollscan datasets import-aitex`), the tiles are loaded once: the
training split `rollscan train` makes (70 % train the bank, 30 % are held out), synthetic
defects pasted on the held-out good tiles, and the test tiles; the teacher's patch embeddings
once per level set and zoom. For every lever a bank is fitted (the product's greedy coreset) and
both sets scored. "syn" is what a choice may be made by (tile / pixel AUROC on the held-out
tiles and their synthetic defects, each faded by a random factor in `--strength`, masks widened
by `--mask-margin`; `--syn-kind warped`: yarns bent instead, `warped_copies`); "test" is the
fabric's test set, printed to be measured, never to choose.

Levers: `levels123` the bank over levels 1 2 3 (`levels12`, `level2` likewise); `level-norm`
each level scaled to a unit root-mean-square norm over the good patches (so the levels weigh
alike), `levels123-norm` both; `channel-std` every channel standardised by the good patches;
`k3` the mean distance to the 3 nearest patches; `bank16k` 16,384 patches; `zoomS` the tile
resized by S before the teacher (the map brought back to the tile's size); `shift4` the map
averaged with the map of the tile moved by half a patch cell (4 px, its border mirrored);
`map-median` each tile's map less its own median; `map-highpass` the map less its own wide blur
(σ = 32 px) — a flaw scored against its surroundings. The teacher's
precision, measured against `base` (`--levels` sets both: the levels a fabric's model chose):
`bf16-queries` the teacher in bf16 (BatchNorms folded, as the eager detector runs it) against
the float32 bank; `bf16-refit` a bank fitted afresh on those bf16 features; `bf16-twin` the
float32 coreset's patches as the bf16 teacher computes them (`MemoryBank.twin`, what `rollscan
train` stores and a bf16 worker reads).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from distill.anomaly_map import AnomalyMap
from distill.data.mvtec import Category, load_mask, load_stack
from distill.data.synthetic_defects import paste_defects
from distill.fold import folded_copy
from distill.held_out import split_held_out
from distill.memory_bank import DEFAULT_BANK_SIZE, MemoryBank, patch_embedding, patch_rows
from distill.metrics import image_auroc, pixel_auroc, tile_scores_on
from distill.preprocess import normalise
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHERS, build_teacher
from distill.torch_model import ReverseDistillation
from distill.train import TrainConfig

LEVERS = ("base", "levels123", "levels12", "level2", "level-norm", "levels123-norm",
          "channel-std", "k3", "bank16k", "zoom0.5", "zoom0.75", "zoom1.5", "bf16-queries",
          "bf16-refit", "bf16-twin", "shift4", "map-median", "map-highpass")  # fmt: skip
STRIDE, TILE = 8, 256


@torch.no_grad()
def embeddings(
    teacher, images: np.ndarray, levels, zoom: float = 1.0, shift: int = 0
) -> torch.Tensor:
    """(N, C, g, g) patch embeddings of 256² tiles, g = 32 · zoom (PatchCore's, as the product's);
    `shift`: the tile moved right and down by that many px first (its border mirrored)."""
    out, side = [], STRIDE * round(TILE // STRIDE * zoom)
    for start in range(0, len(images), 16):
        batch = torch.from_numpy(images[start : start + 16])
        x, _ = normalise(batch, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
        if shift:
            x = F.pad(x, (shift, 0, shift, 0), mode="reflect")[..., :TILE, :TILE]
        if side != TILE:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=zoom < 1)
        out.append(patch_embedding(teacher(x), levels, STRIDE, (side, side)))
    return torch.cat(out)


def nearest_k(bank: MemoryBank, e: torch.Tensor, k: int) -> torch.Tensor:
    """(N, g, g) mean distance to the k nearest bank patches (k = 1: the product's search)."""
    if k == 1:
        return bank.distances(e)
    d = torch.cdist(patch_rows(e), bank.bank).topk(k, dim=1, largest=False).values.mean(dim=1)
    return d.reshape(e.shape[0], *e.shape[-2:])


def auroc_pair(maps: np.ndarray, labels, masks, valid) -> tuple[float, float]:
    return image_auroc(tile_scores_on(maps, valid), labels), pixel_auroc(maps, masks, valid=valid)


def warped_copies(
    tiles: np.ndarray, seed: int = 0, copies: int = 2, strength: tuple[float, float] = (0.3, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Defective copies whose flaw is a change of structure, not of tone: the yarns bent within
    a band across the tile (a crease, a curled weft, a thick place), pixels moved by a smooth
    field of 1.5–4 px times the fade (at least 1 px), the mask where they moved half as far."""
    rng = np.random.default_rng([seed, 0xC0A1])
    h, w = tiles.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    images, masks = [], []
    for _ in range(copies):
        for tile in tiles:
            vertical = rng.random() < 0.5
            across, along = (xs, ys) if vertical else (ys, xs)
            side_across, side_along = (w, h) if vertical else (h, w)
            centre, half = rng.uniform(0.2, 0.8) * side_across, rng.uniform(3, 10)
            start, length = rng.uniform(0, 0.5) * side_along, rng.uniform(0.3, 1.0) * side_along
            window = np.clip(np.minimum(along - start, start + length - along) / 8, 0, 1)
            bump = np.exp(-((across - centre) ** 2) / (2 * half**2)) * window
            amplitude = max(rng.uniform(1.5, 4.0) * rng.uniform(*strength), 1.0)
            turn = rng.uniform(0, 2 * np.pi)  # bent along the yarn, across it, or both
            dy, dx = amplitude * bump * np.sin(turn), amplitude * bump * np.cos(turn)
            moved = np.stack(
                [
                    ndimage.map_coordinates(tile[..., c], [ys + dy, xs + dx], order=1,
                                            mode="reflect")
                    for c in range(tile.shape[-1])
                ],
                axis=-1,
            )  # fmt: skip
            images.append(np.clip(np.rint(moved), 0, 255).astype(np.uint8))
            masks.append(np.hypot(dy, dx) >= amplitude / 2)
    return np.stack(images), np.stack(masks)


class FabricSets:
    """One fabric's tiles as the selection and the evaluation see them."""

    def __init__(
        self,
        folder: Path,
        seed: int = 0,
        strength: tuple[float, float] = (0.3, 1.0),
        mask_margin: int = 0,
        kind: str = "pasted",
    ) -> None:
        category = Category.open(folder)
        images = load_stack(category.train, TILE)
        valid = category.valid_masks(category.train, TILE)
        train, held = split_held_out(len(images), TrainConfig.val_ratio, seed,
                                     groups=category.groups_of(category.train))  # fmt: skip
        self.train, self.train_valid = images[train], valid[train]
        good, good_valid = images[held], valid[held]
        make = warped_copies if kind == "warped" else paste_defects
        synthetic, synthetic_masks = make(
            good[good_valid.all(axis=(1, 2))], seed=seed, strength=strength
        )
        if mask_margin:  # masks drawn with a margin round the flaw, as a person marks one
            disk = np.hypot(
                *np.mgrid[-mask_margin : mask_margin + 1, -mask_margin : mask_margin + 1]
            )
            synthetic_masks = np.stack(
                [ndimage.binary_dilation(m, disk <= mask_margin) for m in synthetic_masks]
            )
        self.selection = np.concatenate([good, synthetic])
        self.selection_labels = np.r_[np.zeros(len(good)), np.ones(len(synthetic))]
        self.selection_masks = np.concatenate([np.zeros_like(good_valid), synthetic_masks])
        self.selection_valid = np.concatenate([good_valid, np.ones_like(synthetic_masks)])
        samples = category.test
        self.test = load_stack([s.path for s in samples], TILE)
        self.test_labels = np.array([s.label for s in samples])
        self.test_masks = np.stack([load_mask(s.mask_path, (TILE, TILE)) for s in samples])
        self.test_valid = category.valid_masks([s.path for s in samples], TILE)
        self._embedded: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def embedded(self, teacher, levels, zoom: float, shift: int = 0) -> tuple[torch.Tensor, ...]:
        """(train, selection, test) embeddings, computed once per teacher, level set, zoom and
        shift: most levers share them and differ only in the bank."""
        key = (id(teacher), tuple(levels), zoom, shift)
        if key not in self._embedded:
            self._embedded[key] = tuple(
                embeddings(teacher, images, levels, zoom, shift)
                for images in (self.train, self.selection, self.test)
            )
        return self._embedded[key]


class Bf16Teacher:
    """The teacher as the eager bf16 detector runs it: BatchNorms folded, under autocast."""

    def __init__(self, teacher) -> None:
        self.teacher = folded_copy(ReverseDistillation(teacher)).teacher
        self.channels = teacher.channels

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.teacher(x)


def measure(teacher, sets: FabricSets, lever: str, base_levels=(2, 3), bf16=None) -> dict:
    """One lever's bank, fitted on the training tiles and scored on both sets."""
    fixed = {"levels123": (1, 2, 3), "levels12": (1, 2), "level2": (2,)}
    levels = fixed.get(lever.removesuffix("-norm"), tuple(base_levels))
    zoom = float(lever[4:]) if lever.startswith("zoom") else 1.0
    train, selection, test = sets.embedded(teacher, levels, zoom)
    if lever.startswith("bf16"):
        bf16 = bf16 or Bf16Teacher(teacher)
        train16, selection, test = sets.embedded(bf16, levels, zoom)
        if lever == "bf16-refit":
            train = train16
    grid = train.shape[-1]
    centres = ((torch.arange(grid) + 0.5) * TILE / grid).long()  # the patches' centre pixels
    keep = torch.from_numpy(sets.train_valid)[:, centres][:, :, centres]
    patches = patch_rows(train, keep)
    shift, scale = torch.zeros(train.shape[1]), torch.ones(train.shape[1])
    if lever == "channel-std":
        shift, scale = patches.mean(dim=0), patches.std(dim=0).clamp_min(1e-6)
    elif lever.endswith("-norm"):
        start = 0
        for width in (teacher.channels[level] for level in levels):
            scale[start : start + width] = (
                patches[:, start : start + width].square().sum(1).mean().sqrt()
            )
            start += width

    def standard(e: torch.Tensor) -> torch.Tensor:
        return (e - shift[:, None, None]) / scale[:, None, None]

    size = 16384 if lever == "bank16k" else DEFAULT_BANK_SIZE
    twins = [standard(train16)] if lever == "bf16-twin" else None
    bank = MemoryBank.fit([(standard(train), keep)], levels, STRIDE, size, twins=twins)
    if twins:
        bank.use_twin()
    smooth, k = AnomalyMap(), 3 if lever == "k3" else 1

    def maps(e: torch.Tensor) -> np.ndarray:
        return smooth.upsampled(nearest_k(bank, standard(e), k), (TILE, TILE)).numpy()

    def lever_maps(e: torch.Tensor, which: int, valid: np.ndarray) -> np.ndarray:
        m = maps(e)
        if lever == "shift4":  # the patch grid moved by half a cell, the two maps averaged
            moved = maps(sets.embedded(teacher, levels, zoom, shift=4)[which])
            m = (m + np.pad(moved[:, 4:, 4:], ((0, 0), (0, 4), (0, 4)), mode="edge")) / 2
        elif lever == "map-median":  # each tile's own level taken off
            level = [np.median(t[v]) if v.any() else 0.0 for t, v in zip(m, valid, strict=True)]
            m = m - np.array(level)[:, None, None]
        elif lever == "map-highpass":  # the map above its own wide blur (σ = 32 px)
            m = m - ndimage.gaussian_filter(m, (0, 32, 32), mode="reflect")
        return m

    return {
        "syn": auroc_pair(lever_maps(selection, 1, sets.selection_valid), sets.selection_labels,
                          sets.selection_masks, sets.selection_valid),
        "test": auroc_pair(lever_maps(test, 2, sets.test_valid), sets.test_labels,
                           sets.test_masks, sets.test_valid),
    }  # fmt: skip


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=Path, default=root / "runs" / "aitex" / "tiles")
    p.add_argument("--fabric", action="append", default=None)
    p.add_argument("--teacher", default=TrainConfig.teacher, choices=sorted(TEACHERS))
    p.add_argument("--lever", nargs="+", default=list(LEVERS), choices=LEVERS)
    p.add_argument("--levels", type=int, nargs="+", default=[2, 3], help="the base levels")
    p.add_argument(
        "--strength",
        type=float,
        nargs=2,
        default=[0.3, 1.0],
        help="the synthetic defects' fade range (the selection's: 0.3 1.0)",
    )
    p.add_argument(
        "--mask-margin",
        type=int,
        default=0,
        help="px each synthetic mask is widened by (the selection's: 0)",
    )
    p.add_argument(
        "--syn-kind",
        choices=("pasted", "warped"),
        default="pasted",
        help="the synthetic flaws: pasted defects (the selection's) or warped yarns",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = build_teacher(args.teacher, None, seed=0).eval()
    bf16 = Bf16Teacher(teacher)
    fabrics = args.fabric or sorted(d.name[6:] for d in args.tiles.glob("fabric*"))
    results: dict[str, dict] = {}
    print(f"{'fabric':<7}{'lever':<13}{'syn tile':>9}{'syn px':>8}{'test tile':>10}"
          f"{'test px':>8}{'s':>6}")  # fmt: skip
    for fabric in fabrics:
        sets = FabricSets(args.tiles / f"fabric{fabric}", strength=tuple(args.strength),
                          mask_margin=args.mask_margin, kind=args.syn_kind)  # fmt: skip
        for lever in args.lever:
            started = time.perf_counter()
            row = measure(teacher, sets, lever, args.levels, bf16)
            results.setdefault(fabric, {})[lever] = row
            (st, sp), (tt, tp) = row["syn"], row["test"]
            print(f"{fabric:<7}{lever:<13}{st:>9.4f}{sp:>8.4f}{tt:>10.4f}{tp:>8.4f}"
                  f"{time.perf_counter() - started:>6.0f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "teacher": args.teacher,
                    "strength": args.strength,
                    "mask_margin": args.mask_margin,
                    "syn_kind": args.syn_kind,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
