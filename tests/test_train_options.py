"""Every option of `rollscan train` trains and evaluates; the fusion is chosen and calibrated on
good tiles and synthetic defects only."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from cli.main import main
from distill.calibration import calibrate_threshold
from distill.checkpoint import load_detector, read_checkpoint
from distill.data.mvtec import REGIONS_FILE, Category, load_stack
from distill.data.synthetic_defects import write_category
from distill.evaluate import UnmaskedDefectWarning
from distill.held_out import split_held_out
from distill.loss import DistillationLoss
from distill.memory_bank import LEVEL_CHOICES
from distill.metrics import tile_scores_on
from distill.selection import auroc_standard_error, pick_cheapest, pick_weight
from distill.train import TrainConfig, Trainer

TILE = 64


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    root = tmp_path_factory.mktemp("options") / "twill"
    write_category(
        root, n_train=16, n_test_good=6, n_test_defect=7, tile=TILE, weave="twill", seed=4
    )
    return root


def _train_and_evaluate(category, tmp_path, *options):
    model, metrics = tmp_path / "model.pt", tmp_path / "metrics.json"
    args = ["train", "--data", str(category), "--out", str(model), "--epochs", "1"]
    assert main([*args, "--tile", str(TILE), "--fpr", "0.05", *options]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(category), "--json", str(metrics),
                 "--precision", "fp32"]) == 0  # fmt: skip
    return read_checkpoint(model)[0], json.loads(metrics.read_text())


@pytest.mark.parametrize(
    "options",
    [
        ("--loss", "pixel"),
        ("--loss", "flat"),
        ("--loss", "hard"),
        ("--augment", "flip", "shift", "jitter"),
        ("--augment", "none"),
        ("--scorer", "student"),
        ("--scorer", "memory", "--memory-size", "64"),
        ("--scorer", "memory", "--memory-levels", "1", "3", "--memory-stride", "4"),
        ("--scorer", "fused", "--fusion-weight", "0.3"),
        ("--teacher", "efficientnet_lite1"),
        ("--teacher", "efficientnet_lite2"),
        ("--precision", "auto"),  # bf16 autocast where the CPU has it natively, else fp32
        ("--scorer", "memory", "--tile-layout", "fabric"),
        ("--scorer", "memory", "--px-per-mm", "10"),
    ],
    ids=lambda o: " ".join(o),
)
def test_each_training_option_trains_and_evaluates(category, tmp_path, options):
    if "--tile-layout" in options:  # a category holding tiles that start at the fabric's edge
        category = _with_an_edge_start_tile(category, tmp_path / "edge-start")
    card, metrics = _train_and_evaluate(category, tmp_path, *options)
    for key in ("image_auroc", "pixel_auroc", "fpr_at_threshold", "recall_at_threshold"):
        assert 0.0 <= metrics[key] <= 1.0, key
    expected_weight = {"student": 1.0, "memory": 0.0, "fused": 0.3}
    if "--scorer" in options:
        assert card.fusion["weight"] == expected_weight[options[1]]
        assert (card.memory is None) == (options[1] == "student")
    memory_alone = options[:2] == ("--scorer", "memory")
    # the layout the pipeline lays this model's tiles by (tests/test_fabric_extents.py)
    layout = "fabric" if "--tile-layout" in options else "grid"
    detector = load_detector(tmp_path / "model.pt")[0]
    assert detector.tile_layout == layout
    # what a worker checks each roll against (tests/test_input_fit.py): grey tiles, their scale
    scale = 10.0 if "--px-per-mm" in options else None
    assert detector.trained_input == {"channels": 1, "px_per_mm": scale}
    if card.memory is not None:  # each map alone is reported too; a student only when trained
        want = {"memory"} if memory_alone else {"student", "memory"}
        assert set(metrics["scorers"]) >= want and not (
            memory_alone and "student" in metrics["scorers"]
        )
    # the bank's map alone needs no student: none is trained, in no time
    assert (card.metrics["epochs"], card.metrics["best_val_loss"] is None) == (
        (0, True) if memory_alone else (1, False)
    )
    if "--memory-size" in options:
        assert card.memory["size"] == 64
    if "--memory-levels" in options:  # fixed levels: nothing to choose among
        assert (card.memory["levels"], card.memory["stride"]) == ([1, 3], 4)
        assert "levels" not in card.metrics["selection"]
        detector, _ = load_detector(tmp_path / "model.pt", precision="fp32")
        assert detector.model.memory.bank.shape[1] == sum(
            detector.model.teacher.channels[level] for level in (1, 3)
        )
    for key, value in zip(options[::2], options[1::2], strict=False):
        if key in ("--loss", "--teacher", "--precision"):
            assert card.train_config[key[2:]] == value


def test_auto_scorer_takes_the_best_weight_on_synthetic_defects_and_calibrates_on_good(
    category, tmp_path
):
    card, _ = _train_and_evaluate(category, tmp_path)
    selection = card.metrics["selection"]
    trials = {float(w): figures for w, figures in selection["trials"].items()}
    assert set(trials) == {0.0, 0.25, 0.5, 0.75, 1.0}
    top = max(trials.values(), key=lambda t: t["mean"])
    noise = auroc_standard_error(top["tile_auroc"], selection["n_synthetic"], selection["n_good"])
    assert selection["tolerance"] == pytest.approx(noise / 2)
    assert card.fusion["weight"] == pick_weight(trials, selection["tolerance"])
    # the bank's levels: each set tried, the first (the cheapest) kept unless another beats it
    # by more than the tolerance; the chosen set's figure is the chosen weight's
    tried = selection["levels"]
    assert list(tried) == [",".join(map(str, levels)) for levels in LEVEL_CHOICES]
    chosen = ",".join(map(str, card.memory["levels"]))
    assert chosen == list(tried)[pick_cheapest(list(tried.values()), selection["tolerance"])]
    assert tried[chosen] == pytest.approx(trials[card.fusion["weight"]]["mean"])
    # the threshold is the calibration of the held-out good tiles' scores, nothing else
    images = load_stack(Category.open(category).train, TILE)
    _, held_out = split_held_out(len(images), 0.3, 0)
    detector, _ = load_detector(tmp_path / "model.pt", precision="fp32")
    scores = detector.predict(images[held_out]).scores
    assert card.threshold == pytest.approx(calibrate_threshold(scores, 0.05).threshold, rel=1e-5)
    assert card.metrics["selection"]["n_good"] == len(held_out)


def test_the_cheapest_candidate_within_the_noise_of_the_best_is_kept():
    assert pick_cheapest([0.95, 0.96], tolerance=0.02) == 0  # a tie: the cheaper one
    assert pick_cheapest([0.95, 0.98], tolerance=0.02) == 1  # beyond the noise: the better one
    assert pick_cheapest([0.97, 0.98, 0.99], tolerance=0.015) == 1
    assert pick_cheapest([0.97, 0.96, 0.99], tolerance=0.015) == 2
    assert pick_cheapest([0.97], tolerance=0.0) == 0


@pytest.mark.parametrize("stride", [3, 12, 32])
def test_a_memory_stride_that_is_not_offered_is_refused(stride):
    with pytest.raises(ValueError, match="memory stride"):
        TrainConfig(memory_stride=stride)


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ({"tile": 0}, "tile must be"),
        ({"tile": 32}, "tile must be"),
        ({"lr": float("nan")}, "learning rate"),
        ({"lr": -1.0}, "learning rate"),
        ({"level_weights": (1.0, float("nan"), 1.0, 1.0)}, "level weights"),
        ({"max_minutes": -5.0}, "max_minutes"),
    ],
)
def test_numbers_no_model_can_be_trained_with_are_refused_before_training(option, reason):
    """They were refused by the checkpoint's reader, once training had run (or trained on)."""
    with pytest.raises(ValueError, match=reason):
        TrainConfig(**option)


@pytest.mark.parametrize("edge", ["mask", "exclude"])
def test_tiles_across_the_fabric_edge_train_masked_or_excluded(category, tmp_path, edge):
    cat = Category.open(category)
    regions = {p.relative_to(category).as_posix(): [0, 40] for p in cat.train[:5]}
    (category / REGIONS_FILE).write_text(json.dumps(regions))
    try:
        card, _metrics = _train_and_evaluate(category, tmp_path, "--edge", edge)
    finally:
        (category / REGIONS_FILE).unlink()
    n_train = len(cat.train) - len(split_held_out(len(cat.train), 0.3, 0)[1])
    held_in = split_held_out(len(cat.train), 0.3, 0)[0]
    straddling = sum(1 for i in held_in if i < 5)
    assert card.metrics["n_train"] == (n_train - straddling if edge == "exclude" else n_train)
    assert card.train_config["edge"] == edge
    # what the warning on few held-out tiles counts them out of: every good tile, excluded or not
    assert card.metrics["n_good_tiles"] == len(cat.train)


def _with_an_edge_start_tile(category, copy):
    shutil.copytree(category, copy)
    first = sorted((copy / "train" / "good").iterdir())[0]
    first.rename(first.with_name(f"{first.stem}_l01.png"))  # as import-aitex names them
    return copy


def test_a_fabric_layout_model_needs_tiles_that_start_at_the_fabric_edge(
    category, tmp_path, capsys
):
    """Trained without them, it passed every check and reported a roll's selvage as one flaw
    the length of the roll."""
    args = ["train", "--data", str(category), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
            "--tile", str(TILE), "--scorer", "memory", "--tile-layout", "fabric"]  # fmt: skip
    assert main(args) == 2
    assert (
        "no training tile starts at the fabric's edge (named *_lCC.png" in capsys.readouterr().err
    )
    assert not (tmp_path / "m.pt").exists()


def test_an_evaluation_with_good_tiles_only_reports_the_false_alarm_share(
    category, tmp_path, capsys
):
    only_good = tmp_path / "good-only"
    (only_good / "train" / "good").mkdir(parents=True)
    (only_good / "test" / "good").mkdir(parents=True)
    for split in ("train", "test"):
        for p in (category / split / "good").iterdir():
            (only_good / split / "good" / p.name).write_bytes(p.read_bytes())
    _card, metrics = _train_and_evaluate(only_good, tmp_path, "--scorer", "student")
    assert metrics["n_defect"] == 0 and "image_auroc" not in metrics  # NaN: not JSON
    assert 0.0 <= metrics["fpr_at_threshold"] <= 1.0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("6 good and 0 defective test tiles; at the calibrated threshold 0.")
    assert "nan" not in said and "caught" not in said  # no defective tiles: nothing to catch

    # defective test tiles only: the catch rate, not "no calibrated threshold"
    defects_only = tmp_path / "defects-only"
    shutil.copytree(category, defects_only, ignore=shutil.ignore_patterns("good"))
    shutil.copytree(category / "train" / "good", defects_only / "train" / "good")
    assert main(["evaluate", "--model", str(tmp_path / "model.pt"), "--data", str(defects_only),
                 "--precision", "fp32"]) == 0  # fmt: skip
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("0 good and 7 defective test tiles; at the calibrated threshold ")
    assert said.endswith("of defective ones caught") and "flagged" not in said
    # where the figures go is checked first: a folder given for the JSON failed after the
    # whole evaluation, the figures lost
    model = tmp_path / "model.pt"
    for flag, where, says in (("--json", tmp_path, "is a folder"),
                              ("--report", model, "a file stands where its folder would be")):  # fmt: skip
        assert main(["evaluate", "--model", str(model), "--data", str(only_good), flag,
                     str(where)]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert says in err and "Errno" not in err


def test_valid_masks_leave_off_fabric_pixels_out_of_the_tile_score():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, :, 0] = 9.0  # a hot column off the fabric
    maps[0, 1, 2] = 1.0
    valid = np.ones_like(maps, bool)
    valid[0, :, 0] = False
    assert tile_scores_on(maps, valid).tolist() == [1.0, 0.0]
    assert tile_scores_on(maps, None).tolist() == [9.0, 0.0]


def test_hard_mining_damps_the_gradient_of_well_reconstructed_pixels():
    torch.manual_seed(0)
    teacher = torch.randn(1, 8, 4, 4)
    student = teacher.clone()
    student[0, :, 0, 0] = -teacher[0, :, 0, 0]  # one pixel far off, the rest exact
    grads = {}
    for kind in ("flat", "hard"):
        s = student.clone().requires_grad_(True)
        DistillationLoss((1.0,), kind)([teacher], [s]).backward()
        grads[kind] = s.grad[0].norm(dim=0)
    easy = grads["hard"][1:, :].flatten()
    assert torch.allclose(easy, 0.1 * grads["flat"][1:, :].flatten(), rtol=1e-4)
    assert torch.allclose(grads["hard"][0, 0], grads["flat"][0, 0])


def test_validation_counts_the_held_out_tiles_fabric_as_training_does():
    """The validation loss that picks the best epoch leaves the table out, as the steps do."""
    trainer = Trainer(TrainConfig(teacher_weights="random", tile=TILE))
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, TILE, TILE, 1),
                                                               dtype=np.uint8))  # fmt: skip
    tiles[:, :, : TILE // 2] = 255  # a white table over the left half of every tile
    everywhere = torch.ones(10, TILE, TILE, dtype=torch.bool)
    fabric = everywhere.clone()
    fabric[:, :, : TILE // 2] = False
    unmasked = trainer.validate(tiles)
    assert trainer.validate(tiles, valid=everywhere) == pytest.approx(unmasked, rel=1e-5)
    on_fabric = trainer.validate(tiles, valid=fabric)
    assert on_fabric != pytest.approx(unmasked, rel=1e-3)
    # the steps' own loss on the same tiles and masks
    teacher, student = trainer.features(trainer.inputs(tiles))
    expected = trainer.loss(teacher, student, fabric).item()
    assert on_fabric == pytest.approx(expected, rel=1e-4)


def test_bf16_training_runs_in_bf16_channels_last_and_refuses_a_cpu_without_it():
    from distill.inference import bf16_supported
    from distill.train import TrainConfig, Trainer

    with pytest.raises(ValueError, match="unknown precision"):
        TrainConfig(precision="fp16")
    config = TrainConfig(teacher_weights="random", tile=TILE, precision="auto")
    if not bf16_supported(torch.device("cpu")):
        with pytest.raises(ValueError, match="no native bf16"):
            Trainer(TrainConfig(teacher_weights="random", tile=TILE, precision="bf16"))
        assert not Trainer(config).bf16
        return
    trainer = Trainer(config)
    assert trainer.bf16 and trainer.channels_last
    batch = torch.randint(0, 256, (2, TILE, TILE, 3), dtype=torch.uint8)
    teacher, student = trainer.features(trainer.inputs(batch))
    assert all(t.dtype == torch.float32 for t in [*teacher, *student])  # the loss in float32
    assert np.isfinite(trainer.train_step(batch, None))
    # fp32 training keeps NCHW: its models are what they were before bf16 existed
    assert not Trainer(TrainConfig(teacher_weights="random", tile=TILE)).channels_last


def test_tiles_of_another_size_than_the_models_are_refused_unless_resized(
    category, tmp_path, capsys
):
    """`--tile 128` on 64-px tiles resized every tile: the model learnt the weave at twice its
    scale, while the worker cuts native 128-px tiles from the roll. Refused, with the way out;
    `--resize` (whole images of a benchmark) still trains, and the card records it."""
    model = tmp_path / "model.pt"
    args = ["train", "--data", str(category), "--out", str(model), "--epochs", "1", "--tile",
            "128", "--scorer", "memory", "--teacher-weights", "random"]  # fmt: skip
    assert main(args) == 2
    assert "64 × 64 px, not the model's 128-px tile" in capsys.readouterr().err
    assert not model.exists()
    assert main([*args, "--resize"]) == 0
    card, _ = read_checkpoint(model)
    assert card.tile == 128 and card.train_config["resize"] is True


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (("--fusion-weight", "0.9"), "--fusion-weight applies to --scorer fused only"),
        (("--scorer", "student", "--memory-size", "7"), "--scorer student builds no memory bank"),
        (("--scorer", "memory", "--loss", "hard"), "--scorer memory trains no student"),
        (("--scorer", "memory", "--augment", "flip", "none"), "--scorer memory trains no student"),
    ],
    ids=["weight with auto", "bank with student", "loss with memory", "augment with memory"],
)
def test_options_the_scorer_would_ignore_are_refused(category, tmp_path, capsys, options, says):
    """They were recorded in the card and ignored: `--fusion-weight 0.9` with the default scorer
    trained a model of weight 0."""
    model = tmp_path / "model.pt"
    assert main(["train", "--data", str(category), "--out", str(model), "--tile", str(TILE),
                 *options]) == 2  # fmt: skip
    assert says in capsys.readouterr().err and not model.exists()


def test_a_threshold_from_few_held_out_tiles_is_said_and_warned(category, tmp_path, capsys):
    model = tmp_path / "model.pt"
    assert main(["train", "--data", str(category), "--out", str(model), "--tile", str(TILE),
                 "--scorer", "memory", "--loss", "pixel", "--augment", "none"]) == 0  # fmt: skip
    out, err = capsys.readouterr()  # the defaults written out are no options to refuse
    assert "(the student's share, --scorer memory)" in out
    assert "from 4 held-out good tiles" in out
    assert "warning: the threshold rests on 4 held-out good tiles" in err
    assert "train on at least 67 good tiles" in err
    assert re.search(r"bank [\d,]+: 100%.*\b12/12 ", err)  # the bank's pass shows its progress


def test_a_diverged_training_is_a_clear_error(category, tmp_path, capsys):
    """`--lr 1e30`: NaN losses ended in "Expected state_dict to be dict-like, got NoneType"."""
    model = tmp_path / "model.pt"
    assert main(["train", "--data", str(category), "--out", str(model), "--tile", str(TILE),
                 "--epochs", "3", "--lr", "1e30", "--scorer", "student"]) == 2  # fmt: skip
    assert "training diverged" in capsys.readouterr().err and not model.exists()


def test_excluding_the_edge_tiles_of_a_category_of_edge_tiles_only_is_refused(
    category, tmp_path, capsys
):
    cat = Category.open(category)
    regions = {p.relative_to(category).as_posix(): [0, 40] for p in cat.train}
    (category / REGIONS_FILE).write_text(json.dumps(regions))
    try:
        args = ["train", "--data", str(category), "--out", str(tmp_path / "m.pt"), "--tile",
                str(TILE), "--edge", "exclude", "--scorer", "memory"]  # fmt: skip
        assert main(args) == 2
    finally:
        (category / REGIONS_FILE).unlink()
    assert "--edge exclude leaves none" in capsys.readouterr().err


def test_evaluate_refuses_tiles_of_another_size_unless_the_model_was_resized(
    category, tmp_path, capsys
):
    """A 64-px model on 128-px test tiles resized them silently (every good tile flagged)."""
    big = tmp_path / "big"
    write_category(big, n_train=2, n_test_good=2, n_test_defect=2, tile=128, weave="twill", seed=5)
    model = tmp_path / "model.pt"
    assert main(["train", "--data", str(category), "--out", str(model), "--tile", str(TILE),
                 "--scorer", "memory"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(big)]) == 2
    assert (
        "not the model's 64-px tile: the model scores rolls at that scale"
        in capsys.readouterr().err
    )
    # a defect tile without its mask: said, not silently counted as good pixels
    mask = next((category / "ground_truth").rglob("*_mask.png"))
    moved = mask.rename(tmp_path / mask.name)
    try:
        with pytest.warns(UnmaskedDefectWarning, match="defect tile.s. have no mask"):
            assert main(["evaluate", "--model", str(model), "--data", str(category)]) == 0
    finally:
        moved.rename(mask)


def test_a_truncated_training_image_is_named(tmp_path):
    """PIL's "image file is truncated" did not say which of hundreds of tiles it was."""
    from PIL import Image

    from distill.data.mvtec import load_image

    path = tmp_path / "tile_017.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(OSError, match=r"tile_017\.png: image file is truncated"):
        load_image(path)
