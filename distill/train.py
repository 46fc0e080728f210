"""Training: the official recipe (Adam 0.005, batch 4, plateau schedule, early stop, 30 % held out),
then a memory bank over the training tiles and the choice of how the map is made.

With `scorer="memory"` no student is trained: the map is the bank's alone, so training takes a
minute instead of hours (the checkpoint keeps the student's initial weights, unused).

The held-out good tiles serve three times: validation loss for the schedule and early stop; the
statistics of each map on good fabric and, with synthetic defects pasted in, the choice of the
fusion weight (`distill.selection`); then the calibration of the decision threshold to a target
false-alarm rate.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur
from tqdm.auto import tqdm

from distill.anomaly_map import MapFusion
from distill.augment import augment
from distill.calibration import calibrate_threshold
from distill.checkpoint import (
    ModelCard,
    partial_checkpoint,
    save_checkpoint,
    writable_checkpoint_path,
)
from distill.data.aitex_edge_tiles import check_edge_start_tiles
from distill.data.mvtec import Category, check_native_size, load_stack
from distill.fold import folded_copy
from distill.held_out import split_held_out
from distill.inference import Detector, bf16_supported, resolve_device, use_bf16
from distill.input_fit import training_input
from distill.int8_features import pick_calibration_tiles
from distill.loss import DistillationLoss
from distill.memory_bank import (
    DEFAULT_LEVELS,
    LEVEL_CHOICES,
    MemoryBank,
    patch_embedding,
)
from distill.metrics import tile_scores_on
from distill.preprocess import normalise
from distill.progress import progress_bar
from distill.selection import Selection, choose_fusion, pick_cheapest
from distill.student_fit import StudentFit, fit_student
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher
from distill.teacher_cache import VALIDATION_BATCH, TeacherCache
from distill.torch_model import ReverseDistillation
from distill.train_config import TrainConfig

log = logging.getLogger(__name__)


def _blur(x: torch.Tensor) -> torch.Tensor:
    # the official recipe blurs train and validation inputs (3×3, σ = 0.8, torchvision's default)
    return gaussian_blur(x, kernel_size=[3, 3], sigma=[0.8, 0.8])


def _padded(valid: torch.Tensor, width: int) -> torch.Tensor:
    """Fabric masks padded (as not fabric) to the model's padded input size."""
    pad = width - valid.shape[-1]
    return torch.nn.functional.pad(valid, (0, pad, 0, width - valid.shape[-2])) if pad else valid


class Trainer:
    """One training run's model, loss and optimiser, and the steps `train` drives: epochs of the
    student, the memory bank, the choice of scoring."""

    def __init__(self, config: TrainConfig, channels_last: bool | None = None) -> None:
        """`channels_last` None: with bf16 only — it triples bf16's speed on the CPU and gains
        nothing in fp32 (bench/train_throughput.py), where NCHW keeps results as they were."""
        self.config = config
        self.device = resolve_device(config.device)
        self.bf16 = use_bf16(config.precision, self.device)
        self.channels_last = self.bf16 if channels_last is None else channels_last
        torch.manual_seed(config.seed)
        teacher = build_teacher(config.teacher, config.teacher_weights, seed=config.seed)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = ReverseDistillation(teacher, config.variant, sigma=config.sigma).to(
            self.device, memory_format=memory_format
        )
        self.loss = DistillationLoss(config.level_weights, config.loss).to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        # In bf16 the frozen teacher runs as the bf16 detector runs it (BatchNorms folded, ReLUs
        # fused) and Adam as one fused kernel: 3–17 % faster steps on a 2-core Zen 4, the rounding
        # aside the same arithmetic; fp32 keeps the recipe's kernels and so its results bitwise.
        self.teacher = (
            folded_copy(self.model).teacher.to(memory_format=memory_format)
            if self.bf16
            else self.model.teacher
        )
        self.optimizer = torch.optim.Adam(
            self.model.student.parameters(), lr=config.lr, betas=config.betas,
            fused=True if self.bf16 else None,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=0.1, patience=config.lr_patience
        )

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) images as the student trains on them: normalised, blurred 3×3."""
        x, _ = normalise(images, IMAGENET_MEAN, IMAGENET_STD, self.device)
        x = _blur(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's features of `inputs` (bf16 under `self.bf16`)."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.no_grad(), autocast:
            return self.teacher(x)

    def features(self, x: torch.Tensor) -> tuple[list, list]:
        """Teacher and student features of `inputs`, in float32 (computed in bf16 under
        `self.bf16`); the student's carry gradients in training mode."""
        return self.student_features(self.teacher_features(x))

    def student_features(self, teacher: list[torch.Tensor]) -> tuple[list, list]:
        """`features` from the teacher's (computed or cached)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            student = self.model.student(teacher)
        if not self.bf16:
            return teacher, student
        return [t.float() for t in teacher], [s.float() for s in student]

    def _on_device(
        self, valid: torch.Tensor | None, teacher: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """Fabric masks on the training device, padded to the model's input size."""
        if valid is None:
            return None
        return _padded(valid.to(self.device), teacher[0].shape[-1] * 4)

    def train_step(
        self,
        batch: torch.Tensor,
        valid: torch.Tensor | None,
        teacher: list[torch.Tensor] | None = None,
    ) -> float:
        """One step on a batch of tiles; `teacher`: their teacher's features, if cached (never
        with augmentation: `teacher_cache.cache_for`)."""
        if teacher is None:
            if self.config.augment:
                batch, valid = augment(
                    batch.float().div_(255), self.config.augment, self.generator, valid
                )
            teacher = self.teacher_features(self.inputs(batch))
        teacher, student = self.student_features(teacher)
        loss = self.loss(teacher, student, self._on_device(valid, teacher))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def train_epoch(
        self,
        images: torch.Tensor,
        bar: tqdm,
        valid: torch.Tensor | None = None,
        cache: TeacherCache | None = None,
    ) -> float:
        self.model.train()
        order = torch.randperm(images.shape[0], generator=self.generator)
        total, count = 0.0, 0
        for start in range(0, len(order), self.config.batch):
            idx = order[start : start + self.config.batch]
            batch = images[idx]
            if batch.shape[0] < 2 and len(order) > 1:
                continue  # BatchNorm cannot train on a batch of one
            keep = None if valid is None else valid[idx]
            teacher = None if cache is None else cache.take(idx)
            total += self.train_step(batch, keep, teacher) * batch.shape[0]
            count += batch.shape[0]
            bar.update(batch.shape[0])
            bar.set_postfix(  # not refreshed here: a bar written as lines would write each
                loss=f"{total / count:.4f}",
                lr=f"{self.optimizer.param_groups[0]['lr']:.0e}",
                refresh=False,
            )
        return total / max(count, 1)

    @property
    def level_choices(self) -> tuple[tuple[int, ...], ...]:
        """The memory bank's level sets the selection tries (one when the config fixes it)."""
        levels = self.config.memory_levels
        return LEVEL_CHOICES if levels is None else (tuple(levels),)

    @torch.no_grad()
    def fit_memory_bank(
        self,
        images: torch.Tensor,
        valid: torch.Tensor | None = None,
        levels: Sequence[int] = DEFAULT_LEVELS,
        progress: bool = False,
    ) -> MemoryBank:
        """A coreset of the training tiles' patch features at `levels`, as the detector will see
        them (no blur, no augmentation); with `valid`, only patches whose centre lies on fabric.

        Where the device runs bf16 natively the bank gets its bf16 twin (the same patches from
        the teacher as the bf16 detector runs it: channels-last, BatchNorms folded, autocast —
        channels-last and NCHW bf16 convolutions round apart), so that a bf16 worker scores the
        teacher in bf16 too."""
        self.model.eval()
        twin_teacher = None
        if bf16_supported(self.device):  # as `Detector` makes its eager copy
            scoring = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            twin_teacher = folded_copy(scoring).teacher
        embeddings, twins = [], []
        stride = self.config.memory_stride
        # minutes on a busy CPU (263 s seen) without a line: the teacher's pass is most of it
        with progress_bar(total=images.shape[0], desc=f"bank {','.join(map(str, levels))}",
                          unit="tile", disable=not progress) as bar:  # fmt: skip
            for start in range(0, images.shape[0], 16):
                x, _ = normalise(
                    images[start : start + 16], IMAGENET_MEAN, IMAGENET_STD, self.device
                )
                size = tuple(x.shape[-2:])
                e = patch_embedding(self.model.teacher(x), levels, stride, size).cpu()
                if twin_teacher is not None:
                    cl = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16):
                        twins.append(patch_embedding(twin_teacher(cl), levels, stride, size).cpu())
                keep = None
                if valid is not None:
                    centre = stride // 2
                    keep = _padded(valid[start : start + 16], size[-1])[
                        :, centre::stride, centre::stride
                    ]
                embeddings.append(e if keep is None else (e, keep))
                bar.update(len(x))
        bank = MemoryBank.fit(
            embeddings, levels, self.config.memory_stride, size=self.config.memory_size,
            seed=self.config.seed, twins=twins if twin_teacher is not None else None,
        )  # fmt: skip
        bank.twin_device = None if twin_teacher is None else self.device.type
        return bank

    def choose_scoring(
        self,
        train_images: torch.Tensor,
        held_out: torch.Tensor,
        train_valid: torch.Tensor | None = None,
        held_out_valid: np.ndarray | None = None,
        progress: bool = False,
    ) -> Selection:
        """Fit the memory bank when any candidate uses it, choose the fusion, attach both.

        With several level sets for the bank (`level_choices`), each gets its bank and its
        fusion choice; the first (the cheapest) stays unless another beats it by more than one
        standard error (`pick_cheapest`)."""
        weights = self.config.fusion_weights
        candidates = self.level_choices if min(weights) < 1 else (None,)
        tried = []
        for levels in candidates:
            # each phase says what it does and what it took: they ran for minutes in silence
            began = time.perf_counter()
            memory = (
                None
                if levels is None
                else self.fit_memory_bank(train_images, train_valid, levels, progress)
            )
            if memory is not None:
                log.info("memory bank on levels %s: %d patches of %d tiles (%.1f s)",
                         ",".join(map(str, memory.levels)), memory.bank.shape[0],
                         len(train_images), time.perf_counter() - began)  # fmt: skip
            began = time.perf_counter()
            self.model.set_scoring(memory, MapFusion())
            selection = choose_fusion(
                self.model, held_out.numpy(), IMAGENET_MEAN, IMAGENET_STD, valid=held_out_valid,
                weights=weights, seed=self.config.seed,
            )  # fmt: skip
            log.info("student's share of the map chosen by synthetic defects on %d held-out "
                     "tiles: %g (%.1f s)", len(held_out), selection.fusion.weight,
                     time.perf_counter() - began)  # fmt: skip
            tried.append((memory, selection, selection.trials[selection.fusion.weight]["mean"]))
        best = max(tried, key=lambda t: t[2])[1]
        memory, selection, _ = tried[pick_cheapest([t[2] for t in tried], best.tolerance)]
        if len(tried) > 1:
            selection.levels = {",".join(map(str, m.levels)): mean for m, _, mean in tried}
        if memory is not None and selection.fusion.uses_student:
            # a student's map keeps the teacher float32 (`mixed_precision_features`): the bank's
            # bf16 twin would never be read, so the checkpoint does not carry it
            memory.twin, memory.twin_device = None, None
        self.model.set_scoring(memory if selection.fusion.uses_memory else None, selection.fusion)
        return selection

    @torch.no_grad()
    def validate(
        self,
        images: torch.Tensor,
        cache: TeacherCache | None = None,
        valid: torch.Tensor | None = None,
    ) -> float:
        """The loss on held-out tiles, over their fabric (`valid`) as training counts it."""
        self.model.eval()
        total = 0.0
        for start in range(0, images.shape[0], VALIDATION_BATCH):
            rows = slice(start, start + VALIDATION_BATCH)
            batch = images[rows]
            teacher = (
                self.teacher_features(self.inputs(batch)) if cache is None else cache.take(rows)
            )
            teacher, student = self.student_features(teacher)
            fabric = None if valid is None else self._on_device(valid[rows], teacher)
            total += self.loss(teacher, student, fabric).item() * batch.shape[0]
        return total / images.shape[0]


def _save_best_so_far(partial: Path, model: ReverseDistillation, card: ModelCard) -> None:
    """A snapshot for a crash only: the best weights stay in memory, so a disk that fills up
    costs the snapshot, not the training (it ended an hour's run at its first better epoch)."""
    try:
        save_checkpoint(partial, model, card)
    except OSError as exc:
        log.warning("the best model so far could not be kept on disk (%s); training goes on", exc)


def train(
    data: str | Path, out: str | Path, config: TrainConfig, progress: bool = True
) -> ModelCard:
    """Train on DIR/train/good, keep the best student (validation loss), fit the memory bank,
    choose the fusion by synthetic defects, calibrate the threshold, save."""
    started = time.perf_counter()
    out = writable_checkpoint_path(out)  # refused now, not after an hour of training
    partial = partial_checkpoint(out)
    category = Category.open(data)
    if config.tile_layout == "fabric":
        check_edge_start_tiles(category.train)
    if not config.resize:
        check_native_size(category.train, config.tile)
    images = torch.from_numpy(load_stack(category.train, config.tile))
    valid = category.valid_masks(category.train, config.tile)
    valid = None if valid is None else torch.from_numpy(valid)
    train_idx, val_idx = split_held_out(
        images.shape[0], config.val_ratio, config.seed, config.held_out,
        category.groups_of(category.train),
    )  # fmt: skip
    train_valid = val_valid = None
    if valid is not None:
        train_valid, val_valid = valid[train_idx], valid[val_idx].numpy()
        if config.edge == "exclude":
            train_idx = train_idx[train_valid.flatten(1).all(dim=1).numpy()]
            train_valid = None
            if not len(train_idx):
                raise ValueError(
                    "every training tile crosses the fabric's edge: --edge exclude leaves none "
                    "to train on (--edge mask trains on their fabric pixels)"
                )
    train_images, val_images = images[train_idx], images[val_idx]
    trainer = Trainer(config)
    card = ModelCard(
        teacher=config.teacher,
        teacher_weights=trainer.model.teacher.weights_source,
        teacher_sha256=trainer.model.teacher.weights_sha256(),
        variant=config.variant,
        tile=config.tile,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        sigma=config.sigma,
        level_weights=tuple(config.level_weights),
        target_fpr=config.fpr,
        # with the tiles' colour: a worker refuses a roll unlike them (`distill.input_fit`)
        train_config={
            **{k: v for k, v in asdict(config).items() if k != "extra"},
            **training_input(images.numpy(), config.px_per_mm),
        },
    )
    log.info("training on %d tiles of %s, %d held out", len(train_idx), data, len(val_idx))
    if config.scorer == "memory":  # the map is the bank's alone: a student would go unused
        fit = StudentFit(best_state=trainer.model.student.state_dict())
    else:
        fit = fit_student(
            trainer, train_images, train_valid, val_images,
            lambda: _save_best_so_far(partial, trainer.model, card), progress,
            None if val_valid is None else torch.from_numpy(val_valid),
        )  # fmt: skip
    trainer.model.student.load_state_dict(fit.best_state)
    selection = trainer.choose_scoring(train_images, val_images, train_valid, val_valid, progress)
    fusion = selection.fusion
    card.fusion = {
        "weight": fusion.weight, "student": list(fusion.student_stats),
        "memory": list(fusion.memory_stats),
    }  # fmt: skip
    memory = trainer.model.memory
    if memory is not None:
        card.memory = {
            "levels": list(memory.levels), "stride": memory.stride,
            "size": int(memory.bank.shape[0]), "bf16_twin": memory.twin_device,
        }  # fmt: skip
    began = time.perf_counter()
    detector = Detector(trainer.model, card.mean, card.std, device=trainer.device, precision="fp32")
    val_maps = detector.predict(val_images.numpy(), fabric=val_valid).maps
    val_scores = tile_scores_on(val_maps, val_valid)
    calibration = calibrate_threshold(val_scores, config.fpr)
    card.threshold = calibration.threshold
    log.info("threshold %.4g calibrated on %d held-out tiles (%.1f s)", card.threshold,
             len(val_images), time.perf_counter() - began)  # fmt: skip
    card.metrics = {
        "epochs": len(fit.history["val_loss"]),
        "best_epoch": fit.best_epoch,
        "best_val_loss": fit.best_loss if fit.best_epoch else None,
        "n_train": len(train_idx),
        "n_held_out": len(val_idx),
        "n_good_tiles": int(images.shape[0]),  # before `--edge exclude` left some out
        "held_out_score_max": float(val_scores.max()),
        "held_out_score_mean": float(val_scores.mean()),
        "threshold_method": calibration.method,
        "selection": selection.as_dict(),
        "seconds": round(time.perf_counter() - started, 1),
        **fit.history,
    }
    save_checkpoint(out, trainer.model, card, pick_calibration_tiles(train_images))
    partial.unlink(missing_ok=True)
    return card
