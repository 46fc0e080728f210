"""Weight files and checkpoints are data, never code (issue 13 item 7).

A teacher weight file reaches a worker from the CLI (`rollscan train --teacher-weights`) and from
a `rollscan.train` message's config; a checkpoint from `rollscan models register` and the
registry. Each is read without unpickling anything but tensors, and a checkpoint's card numbers
are checked before a worker trusts them with every tile of every roll.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from sqlalchemy import func, select

from distill.checkpoint import CheckpointError, random_checkpoint, read_checkpoint
from distill.data.synthetic_defects import write_category
from distill.teacher import TeacherWeightsError, build_teacher
from storage.registry import RegistryError, register_model
from storage.schema import Model
from storage.settings import Settings
from worker.context import WorkerContext
from worker.inline import InlineEnqueuer
from worker.training import train_and_register


class RunsCode:
    """Unpickling this creates `marker`: what any code an attacker chose could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def hostile_file(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A weight file whose state dict holds an object that runs code when unpickled."""
    payload = {"conv1.weight": RunsCode(marker), "bn1.weight": torch.ones(64)}
    if legacy:  # torch's pre-1.6 format: a bare pickle, read by another unpickler
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    marker = tmp_path / "code-ran"
    # the payload does run when unpickled: the tests below prove something only because of this
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()
    marker.unlink()
    return marker


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("category")
    return write_category(root / "plain", n_train=4, n_test_good=1, n_test_defect=1, tile=64)


@pytest.mark.parametrize(
    ("name", "legacy"), [("evil.pth", False), ("evil.pt", False), ("legacy.pth", True)]
)
def test_a_teacher_weight_file_that_would_run_code_is_refused(tmp_path, marker, name, legacy):
    path = hostile_file(tmp_path / name, marker, legacy=legacy)
    with pytest.raises(TeacherWeightsError, match=r"refused: .*could run code.*\.safetensors"):
        build_teacher("resnet18", path)
    assert not marker.exists()


def test_refused_whatever_the_installed_releases_default_to(tmp_path, marker, monkeypatch):
    """pyproject allows torch 2.4 and 2.5, whose torch.load unpickles anything unless told
    otherwise, and timm releases whose loader calls torch.load without weights_only: the pair
    the review found running code. Simulated here: the refusal may depend on neither default."""
    real_load = torch.load

    def torch_2_5_load(f, map_location=None, *args, weights_only=None, **kwargs):
        return real_load(f, map_location, *args, weights_only=bool(weights_only), **kwargs)

    def old_timm_load_state_dict(path, use_ema=True, device="cpu", **_):
        return torch.load(path, map_location=device)

    monkeypatch.setattr(torch, "load", torch_2_5_load)
    monkeypatch.setattr(timm.models, "load_state_dict", old_timm_load_state_dict)
    path = hostile_file(tmp_path / "evil.pth", marker)
    with pytest.raises(TeacherWeightsError) as refused:
        build_teacher("resnet18", path)
    assert not marker.exists(), "the weight file's code ran"
    assert "refused" in str(refused.value)


def test_safetensors_and_wrapped_state_dicts_are_read(tmp_path):
    reference = build_teacher("resnet18", "random", seed=3)
    state = reference.backbone.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "r18.safetensors")
    loaded = build_teacher("resnet18", tmp_path / "r18.safetensors")
    assert loaded.weights_source == "file:r18.safetensors"
    assert loaded.weights_sha256() == reference.weights_sha256()
    # a training script's checkpoint: the state dict under "state_dict", DDP's "module." prefix
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}
    torch.save(wrapped, tmp_path / "r18-ddp.pth")
    assert build_teacher("resnet18", tmp_path / "r18-ddp.pth").weights_sha256() == (
        reference.weights_sha256()
    )


def test_a_broken_weight_file_says_what_it_is(tmp_path, marker):
    good = tmp_path / "good.pth"
    torch.save(build_teacher("resnet18", "random").backbone.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(TeacherWeightsError, match="not a readable weight file"):
        build_teacher("resnet18", truncated)
    # a pickle named .safetensors is never unpickled: safetensors has no code path for it
    disguised = hostile_file(tmp_path / "evil.safetensors", marker)
    with pytest.raises(TeacherWeightsError, match="not a readable weight file"):
        build_teacher("resnet18", disguised)
    torch.save([torch.ones(3)], tmp_path / "list.pth")
    with pytest.raises(TeacherWeightsError, match="not a state dict"):
        build_teacher("resnet18", tmp_path / "list.pth")
    assert not marker.exists()


def test_rollscan_train_refuses_hostile_teacher_weights(tmp_path, marker, category, capsys):
    from cli.main import main

    evil = hostile_file(tmp_path / "evil.pth", marker)
    out = tmp_path / "model.pt"
    argv = ["train", "--data", str(category), "--out", str(out), "--teacher", "resnet18",
            "--teacher-weights", str(evil), "--epochs", "1", "--tile", "64"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "rollscan train: error:" in err and "refused" in err and str(evil) in err
    assert not marker.exists() and not out.exists()


def test_a_train_message_cannot_run_code_through_its_config(
    tmp_path, marker, category, db_engine, local_store
):
    """`rollscan.train`'s config comes off the broker: whoever can publish there chooses it."""
    evil = hostile_file(tmp_path / "evil.pth", marker)
    ctx = WorkerContext(
        Settings(data_dir=tmp_path / "d", device="cpu"), db_engine, local_store, InlineEnqueuer()
    )
    config = {"teacher": "resnet18", "teacher_weights": str(evil), "epochs": 1, "tile": 64}
    with pytest.raises(TeacherWeightsError, match="refused"):
        train_and_register(ctx, str(category), "plain", config=config)
    assert not marker.exists()
    with ctx.session() as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 0


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, marker, db_session, local_store):
    path = tmp_path / "evil.pt"
    torch.save({"card": {"format": "rollscan-distill/1"}, "student": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="not a readable rollscan checkpoint"):
        read_checkpoint(path)
    with pytest.raises(RegistryError, match="not a readable rollscan checkpoint"):
        register_model(db_session, local_store, path, fabric_type="plain")
    assert not marker.exists()
    assert list(local_store.iter_objects("models/")) == []


@pytest.fixture(scope="module")
def sound_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = random_checkpoint(tmp_path_factory.mktemp("card") / "sound.pt", teacher="resnet18")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("threshold", float("nan"), "threshold nan"),
        ("threshold", float("inf"), "threshold inf"),
        ("threshold", float("-inf"), "threshold -inf"),
        ("tile", float("nan"), "tile size nan"),
        ("tile", float("inf"), "tile size inf"),
        ("tile", 10**9, "tile size 1000000000"),
        ("tile", 0, "tile size 0"),
        ("tile", "256", "tile size '256'"),
        ("sigma", float("inf"), "sigma inf"),
        ("target_fpr", float("nan"), "target_fpr nan"),
        ("fusion", {"weight": float("nan")}, "fusion weight nan"),
        ("fusion", {"weight": 0.5, "student": [float("nan"), float("inf")]}, "fusion student"),
        ("fusion", {"weight": 0.0, "memory": [1.0, 0.0]}, "fusion memory"),
        ("mean", [0.5, float("nan"), 0.5], "mean"),
        ("std", [0.2, 0.2, float("inf")], "std"),
        ("level_weights", [1.0, 1.0, float("inf"), 1.0], "level_weights"),
        ("std", [0.2, 0.2, -0.2], "the std positive"),
        ("mean", [0.5], "not 3 values each"),
        ("threshold", True, "threshold True"),
    ],
)
def test_a_checkpoint_card_with_numbers_no_model_has_is_never_registered(
    tmp_path, sound_checkpoint, db_session, local_store, field, value, says
):
    payload = {**sound_checkpoint, "card": {**sound_checkpoint["card"], field: value}}
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=says):
        read_checkpoint(path)
    with pytest.raises(RegistryError, match=says):
        register_model(db_session, local_store, path, fabric_type="plain")
    assert db_session.scalar(select(func.count()).select_from(Model)) == 0
    assert list(local_store.iter_objects("models/")) == []


def test_the_sound_checkpoint_is_registered(tmp_path, sound_checkpoint, db_session, local_store):
    """The refusals above are the card's numbers', not the fixture's."""
    path = tmp_path / "sound.pt"
    torch.save(sound_checkpoint, path)
    model, created = register_model(
        db_session, local_store, path, fabric_type="plain", random_teacher_ok=True
    )
    assert created and model.tile == 256


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda payload: payload["card"].update(sigma=1e6), "cannot score a tile: a map of"),
        (lambda payload: payload["card"].update(variant="bogus"), "cannot score a tile"),
        (
            lambda payload: next(
                v for v in payload["student"].values() if v.is_floating_point()
            ).fill_(float("nan")),
            "not finite",
        ),
    ],
    ids=["sigma", "variant", "nan weights"],
)
def test_a_checkpoint_that_loads_but_cannot_score_is_never_registered(
    tmp_path, sound_checkpoint, db_session, local_store, change, says
):
    """NaN weights gave every tile a NaN score (finalize then failed every roll of the fabric),
    a σ of 1e6 failed every band; both were registered."""
    payload = copy.deepcopy(sound_checkpoint)
    change(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(RegistryError, match=says):
        register_model(db_session, local_store, path, fabric_type="plain", random_teacher_ok=True)
    assert db_session.scalar(select(func.count()).select_from(Model)) == 0
