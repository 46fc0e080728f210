"""The frozen teacher's features, cached once a run: the same features a step would compute,
kept only where they may be (bf16, no augmentation, within the budget), and a student trained on
them the same as one trained without."""

import pytest
import torch
from tqdm.auto import tqdm

from distill.inference import bf16_supported
from distill.student_fit import fit_student
from distill.teacher_cache import TeacherCache, bytes_per_tile, cache_for
from distill.train import TrainConfig, Trainer

TILE = 64
BF16 = bf16_supported(torch.device("cpu"))
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no native bf16")


def _tiles(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, TILE, TILE, 3), generator=generator, dtype=torch.uint8)


def _trainer(**options) -> Trainer:
    return Trainer(TrainConfig(teacher_weights="random", tile=TILE, **options))


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_the_cache_holds_what_each_step_would_compute(precision):
    trainer = _trainer(precision=precision)
    tiles = _tiles(11)  # a last batch of 3: the fill's batches are not the steps'
    cache = TeacherCache.build(trainer, tiles, trainer.config.batch)
    idx = torch.tensor([10, 3, 7, 0])
    direct = trainer.teacher_features(trainer.inputs(tiles[idx]))
    cached = cache.take(idx)
    assert len(cached) == len(direct)
    for c, d in zip(cached, direct, strict=True):
        assert c.dtype == d.dtype and c.shape == d.shape and c.stride() == d.stride()
        torch.testing.assert_close(c, d)  # bitwise on the Zen 4 measured; rounding at most
    assert cache.nbytes == bytes_per_tile(trainer, tiles) * len(tiles)


def test_fp32_training_recomputes_the_teacher_as_the_recipe_does():
    train, val, why = cache_for(_trainer(), _tiles(8), _tiles(4, seed=1))
    assert train is None and val is None and "fp32" in why


@needs_bf16
def test_bf16_caches_unless_tiles_are_augmented_or_the_budget_is_too_small():
    tiles, held_out = _tiles(8), _tiles(4, seed=1)
    train, val, why = cache_for(_trainer(precision="bf16"), tiles, held_out)
    assert len(train.take(torch.arange(8))[0]) == 8 and len(val.take(torch.arange(4))[0]) == 4
    assert "computed once" in why
    train, val, why = cache_for(_trainer(precision="bf16", augment=("flip",)), tiles, held_out)
    assert train is None and val is None and "augmented" in why
    train, val, why = cache_for(_trainer(precision="bf16", teacher_cache_mb=0), tiles, held_out)
    assert train is None and val is None and "--teacher-cache-mb 0" in why
    trainer = _trainer(precision="bf16", teacher_cache_mb=1)
    many = _tiles(1 + 2**20 // bytes_per_tile(trainer, tiles))  # one tile more than 1 MiB holds
    train, val, why = cache_for(trainer, many, held_out)
    assert train is None and val is None and "would exceed --teacher-cache-mb 1" in why


@needs_bf16
def test_a_student_trained_on_cached_features_is_the_one_trained_without():
    tiles, held_out = _tiles(10), _tiles(4, seed=1)
    students, teacher_passes = [], []
    for cache_mb in (0, TrainConfig.teacher_cache_mb):
        trainer = _trainer(precision="bf16", epochs=2, teacher_cache_mb=cache_mb)
        passes = []
        trainer.teacher.register_forward_hook(lambda *_, passes=passes: passes.append(1))
        fit = fit_student(trainer, tiles, None, held_out, lambda: None, progress=False)
        students.append(fit.best_state)
        teacher_passes.append(len(passes))
    # recomputed: 3 steps (batches of 4, 4, 2) and 1 validation pass an epoch; cached: the size
    # probe, then the fill (3 training batches, 1 held-out), never again
    assert teacher_passes == [2 * (3 + 1), 1 + 3 + 1]
    for name, weight in students[0].items():  # bitwise on the Zen 4 measured
        torch.testing.assert_close(students[1][name], weight, rtol=1e-3, atol=1e-4, msg=name)


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="teacher_cache_mb"):
        TrainConfig(teacher_cache_mb=-1)


def test_an_epoch_from_the_cache_runs_no_teacher_pass():
    """`train_epoch` takes the cache's features in place of the teacher's pass (fp32 here: the
    path is the same in either precision, only `cache_for` declines fp32)."""
    trainer = _trainer()
    tiles = _tiles(8)
    cache = TeacherCache.build(trainer, tiles, trainer.config.batch)
    passes = []
    trainer.teacher.register_forward_hook(lambda *_: passes.append(1))
    loss = trainer.train_epoch(tiles, tqdm(disable=True), None, cache)
    assert passes == [] and loss > 0
