"""int8 scoring (features quantized by OpenVINO/NNCF on the checkpoint's own good tiles) keeps
the fp32 model's decisions, and refuses to run without tiles to calibrate on."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import TRAIN_TILE

from distill.anomaly_map import MapFusion
from distill.checkpoint import load_detector, random_checkpoint, read_checkpoint
from distill.data.aitex import import_aitex
from distill.evaluate import evaluate_detector
from distill.inference import bf16_supported
from distill.int8_features import CALIBRATION_TILES, Int8Features, pick_calibration_tiles
from distill.memory_bank import DEFAULT_LEVELS, MemoryBank, patch_embedding
from distill.teacher import RANDOM, build_teacher
from distill.torch_model import ReverseDistillation
from distill.train import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_training_keeps_good_tiles_for_calibration(twill_model):
    _, state = read_checkpoint(twill_model)
    tiles = state["calibration_tiles"]
    assert tiles.dtype == torch.uint8
    assert tiles.shape[1:3] == (TRAIN_TILE, TRAIN_TILE)
    assert 1 <= len(tiles) <= CALIBRATION_TILES


def test_calibration_tiles_are_spread_over_the_set_without_repeats():
    images = torch.arange(100).view(100, 1, 1, 1).expand(100, 2, 2, 3)
    picked = pick_calibration_tiles(images, 10)[:, 0, 0, 0].tolist()
    assert picked == sorted(set(picked)) and len(picked) == 10
    assert picked[0] == 0 and picked[-1] == 99
    assert len(pick_calibration_tiles(images[:3], 10)) == 3


def test_int8_keeps_the_fp32_decisions_of_a_trained_model(twill_model):
    data = twill_model.parent / "data"
    fp32, card = load_detector(twill_model, precision="fp32", batch_size=4)
    int8, _ = load_detector(twill_model, precision="int8", batch_size=4)
    assert int8.mode.startswith("int8")
    want = evaluate_detector(fp32, data, card.tile, progress=False)
    got = evaluate_detector(int8, data, card.tile, progress=False)
    assert want["image_auroc"] > 0.9  # a model that decides something
    assert abs(got["image_auroc"] - want["image_auroc"]) <= 0.005
    assert abs(got["pixel_auroc"] - want["pixel_auroc"]) <= 0.005


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: hold the strict figure
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_int8_maps_follow_fp32_and_a_short_batch_builds_nothing_new(tmp_path):
    model = random_checkpoint(tmp_path / "m.pt", tile=64)
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    fp32, _ = load_detector(model, precision="fp32", batch_size=4)
    int8, _ = load_detector(model, precision="int8", batch_size=4, calibration=images)
    want, got = fp32.predict(images), int8.predict(images)  # batches of 4 and 2
    assert got.maps.shape == want.maps.shape == (6, 64, 64)
    # without VNNI, OpenVINO's AVX2 int8 products (u8 × s8 pairs summed in int16) saturate on
    # a random model's wide activations: 0.974 measured on such a CPU, > 0.99 with VNNI. A
    # trained model's decisions hold on both (the test above passed on each)
    floor = 0.99 if _has_vnni() else 0.95
    assert np.corrcoef(want.maps.ravel(), got.maps.ravel())[0, 1] > floor
    assert len(int8.int8._requests) == 1  # the short batch was padded to the same shape
    # tiles holding the table beside the fabric: their maps from the same int8 features, masked
    fabric = np.ones((6, 64, 64), bool)
    fabric[[1, 4], :, :20] = False
    masked = int8.predict(images, fabric).maps
    np.testing.assert_array_equal(masked[[0, 2, 3, 5]], got.maps[[0, 2, 3, 5]])
    assert not np.array_equal(masked[[1, 4]], got.maps[[1, 4]])
    want = fp32.predict(images, fabric).maps
    assert np.corrcoef(want[[1, 4]].ravel(), masked[[1, 4]].ravel())[0, 1] > floor


def test_a_batch_that_does_not_split_evenly_over_the_streams_is_padded(tmp_path):
    """A batch of 5 on 2 streams had compiled a shape for parts of 3 it never used, and run
    the whole batch on one stream."""
    model = random_checkpoint(tmp_path / "m.pt", tile=64)
    images = np.random.default_rng(1).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        int8, _ = load_detector(model, precision="int8", batch_size=5, calibration=images)
    finally:
        torch.set_num_threads(threads)
    assert int8.int8.threads == 2
    got = int8.predict(images)  # batches of 5 and 2, the 2 padded to 5, each to 6 on 2 streams
    assert list(int8.int8._requests) == [(3, 3, 64, 64)]
    alone = int8.predict(images[5:])  # the same tiles in another batch: the same maps
    np.testing.assert_allclose(alone.maps, got.maps[5:], rtol=1e-5, atol=1e-6)
    fp32, _ = load_detector(model, precision="fp32", batch_size=5)
    floor = 0.99 if _has_vnni() else 0.95
    assert np.corrcoef(fp32.predict(images).maps.ravel(), got.maps.ravel())[0, 1] > floor


def test_with_a_memory_bank_the_teacher_runs_unquantized_so_the_bank_sees_fp32_features():
    torch.manual_seed(0)
    model = ReverseDistillation(build_teacher("efficientnet_lite0", RANDOM)).eval()
    x, calibration = torch.randn(4, 3, 64, 64), torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        want = model.teacher(x)
    bank = MemoryBank.fit([patch_embedding(want, DEFAULT_LEVELS, 8, (64, 64))], size=16)
    model.set_scoring(bank, MapFusion(0.5, (0.0, 1.0), (0.0, 1.0)))

    def worst_error(features: Int8Features) -> float:
        got, student = features(x)
        assert len(student) == len(want)
        return max(
            float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True)
        )

    kept = Int8Features(model, calibration, threads=1, bf16=True)
    assert not kept.quantize_teacher
    assert worst_error(kept) < 1e-4
    # the same model with its teacher quantized: the check above can tell the difference
    assert worst_error(Int8Features(model, calibration, threads=1, quantize_teacher=True)) > 1e-2


def test_int8_without_calibration_tiles_is_refused_with_a_reason(tmp_path):
    model = random_checkpoint(tmp_path / "m.pt", tile=64)  # keeps no tiles
    with pytest.raises(ValueError, match="calibrate"):
        load_detector(model, precision="int8")


REAL_AITEX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aitex"


@pytest.mark.aitex
def test_int8_keeps_the_decisions_of_a_model_of_real_fabric(tmp_path):
    """AITEX fabric 01, a short-trained default model (student and memory bank fused): int8, and
    bf16 where the CPU has it, within 0.005 of fp32 — the issue's goal (opt-in, ~4 min)."""
    if not (REAL_AITEX / "README.md").is_file():
        pytest.skip(f"real AITEX data not found at {REAL_AITEX}")
    import_aitex(REAL_AITEX, tmp_path, fabrics=["01"], progress=False)
    data, model = tmp_path / "fabric01", tmp_path / "model.pt"
    train(data, model, TrainConfig(epochs=3), progress=False)
    figures = {}
    fast = ("int8", "bf16") if bf16_supported(torch.device("cpu")) else ("int8",)
    for precision in ("fp32", *fast):
        detector, card = load_detector(model, precision=precision, batch_size=8)
        figures[precision] = evaluate_detector(detector, data, card.tile, progress=False)
    for precision in fast:
        for key in ("image_auroc", "pixel_auroc"):
            error = abs(figures[precision][key] - figures["fp32"][key])
            assert error <= 0.005, (precision, key, figures)


@pytest.mark.aitex
@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_a_bf16_teacher_keeps_a_memory_banks_decisions_through_its_twin(tmp_path):
    """AITEX fabric 03, where bf16 teacher features against the float32 bank moved tile AUROC by
    0.0074: the bank alone (levels 1 2 3, as the selection chooses there) scored by the bf16
    teacher against the bank's bf16 twin stays within 0.005 of fp32 (opt-in, ~3 min)."""
    if not (REAL_AITEX / "README.md").is_file():
        pytest.skip(f"real AITEX data not found at {REAL_AITEX}")
    import_aitex(REAL_AITEX, tmp_path, fabrics=["03"], progress=False)
    data, model = tmp_path / "fabric03", tmp_path / "model.pt"
    train(data, model, TrainConfig(scorer="memory", memory_levels=(1, 2, 3)), progress=False)
    figures = {}
    for precision in ("fp32", "bf16"):
        detector, card = load_detector(model, precision=precision)
        assert detector.model.memory.twin is not None  # trained on this bf16 CPU: it has one
        figures[precision] = evaluate_detector(
            detector, data, card.tile, progress=False, student_trained=False
        )
    for key in ("image_auroc", "pixel_auroc"):
        assert abs(figures["bf16"][key] - figures["fp32"][key]) <= 0.005, (key, figures)


@pytest.mark.aitex
@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_a_student_map_keeps_its_decisions_in_bf16(tmp_path):
    """AITEX fabric 06, a student-only model: with its teacher in bf16 the tile AUROC moved by
    0.0066; the student in bf16 under a float32 teacher (the detector's rule) stays within 0.005
    of fp32 (opt-in, ~3 min)."""
    if not (REAL_AITEX / "README.md").is_file():
        pytest.skip(f"real AITEX data not found at {REAL_AITEX}")
    import_aitex(REAL_AITEX, tmp_path, fabrics=["06"], progress=False)
    data, model = tmp_path / "fabric06", tmp_path / "model.pt"
    train(data, model, TrainConfig(scorer="student", epochs=5, precision="bf16"), progress=False)
    figures = {}
    for precision in ("fp32", "bf16"):
        detector, card = load_detector(model, precision=precision)
        assert detector.model.fusion.uses_student and not detector.model.fusion.uses_memory
        figures[precision] = evaluate_detector(detector, data, card.tile, progress=False)
    for key in ("image_auroc", "pixel_auroc"):
        assert abs(figures["bf16"][key] - figures["fp32"][key]) <= 0.005, (key, figures)
