"""Model registry: checkpoints stored content-addressed (sha256) and recorded in `models`.

One active model per fabric type, plus at most one active generic model (fabric type NULL, a
DG-variant model) used for fabric types that have none. Loading verifies the sha256 of the bytes
read back from the store, so a corrupted or swapped object is never scored with.

A model trained on a teacher loaded from a local file (`--teacher-weights PATH`: the paper's
ResNet34, whose weights no wheel ships) is registered with that file: its teacher's tensors are
stored beside the checkpoints, keyed by the weights hash the card records, and the workers read
them from there (`registered_teacher`); the load checks that hash again.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from distill.checkpoint import (
    CheckpointError,
    ModelCard,
    packed_teacher,
    packed_teacher_sha256,
    read_checkpoint,
    verify_checkpoint,
)
from storage.objectstore import ObjectNotFound, ObjectStore
from storage.schema import SAFE_NAME_RE, Model, Run

MODELS_PREFIX = "models/sha256"
TEACHERS_PREFIX = "models/teachers"


class RegistryError(ValueError):
    """A registry request that cannot be honoured; nothing was written to the database."""


def checkpoint_key(sha256: str) -> str:
    return f"{MODELS_PREFIX}/{sha256}.pt"


def teacher_key(teacher_sha256: str) -> str:
    """Where the teacher of a model trained on a local weight file is stored (by weights hash)."""
    return f"{TEACHERS_PREFIX}/{teacher_sha256}.safetensors"


def _check_version(version: str) -> str:
    if not re.fullmatch(SAFE_NAME_RE, version):
        raise RegistryError(
            f"model version {version!r} is not allowed: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return version


def check_request(
    fabric_type: str | None, version: str | None, variant: str, what: str = "this model"
) -> None:
    """Refuse a registration request that no checkpoint could satisfy — before training one for
    it (`worker.training`), as well as when registering."""
    if fabric_type is None and variant != "dg":
        raise RegistryError(f"the generic model must be a DG-variant model; {what} is {variant!r}")
    if fabric_type is not None and not re.fullmatch(SAFE_NAME_RE, fabric_type):
        raise RegistryError(f"fabric type {fabric_type!r} is not allowed (letters, digits, . _ -)")
    if version is not None:
        _check_version(version)


def check_version_free(session: Session, version: str) -> None:
    """Refuse a version another checkpoint holds (a new checkpoint, or one about to be trained,
    cannot take it)."""
    if session.get(Model, version) is not None:
        raise RegistryError(f"model version {version} already exists with other weights")


def register_model(
    session: Session,
    store: ObjectStore,
    checkpoint: str | Path,
    *,
    fabric_type: str | None,
    version: str | None = None,
    random_teacher_ok: bool = False,
    teacher_weights: str | Path | None = None,
) -> tuple[Model, bool]:
    """Upload and record a checkpoint; returns (row, created).

    Registering the same bytes again is a no-op that returns the existing row (created False),
    provided the fabric type and version asked for agree with it. `fabric_type=None` registers
    the generic model, which must be a DG-variant checkpoint. A model of a randomly initialised
    teacher (`--teacher-weights random`) scores random features: refused unless
    `random_teacher_ok` (tests and speed benchmarks). A model whose teacher was loaded from a
    local file needs that file (`teacher_weights`), whose teacher is stored for the workers.
    """
    data = Path(checkpoint).read_bytes()
    card = _loadable_card(data, checkpoint, teacher_weights)
    if not card.teacher_weights.startswith("file:"):  # a random teacher's: refused below
        teacher_weights = None
    if card.random_teacher and not random_teacher_ok:
        raise RegistryError(
            f"{checkpoint}: its teacher {card.teacher} has random weights (trained with "
            "--teacher-weights random, for tests and speed benchmarks): its scores mean nothing"
        )
    if card.threshold is None:
        raise RegistryError(f"{checkpoint} has no calibrated threshold: train it to the end")
    check_request(fabric_type, version, card.variant, str(checkpoint))
    sha256 = hashlib.sha256(data).hexdigest()
    requested = version
    version = _check_version(version or f"{fabric_type or 'generic'}-{sha256[:12]}")

    existing = session.scalar(select(Model).where(Model.sha256 == sha256))
    if existing is not None:
        _check_same_request(existing, fabric_type, requested)
        _store_verified(store, checkpoint_key(sha256), data, sha256)  # a lost copy is restored
        if teacher_weights is not None:
            _store_teacher(store, card, teacher_weights)
        return existing, False
    check_version_free(session, version)

    if teacher_weights is not None:  # before the row: no worker meets a model without it
        _store_teacher(store, card, teacher_weights)
    key = checkpoint_key(sha256)
    _store_verified(store, key, data, sha256)  # an intact upload left by a failed attempt is reused
    row = {
        "version": version,
        "fabric_type": fabric_type,
        "variant": card.variant,
        "teacher": card.teacher,
        "teacher_sha256": card.teacher_sha256,
        "tile": card.tile,
        "checkpoint_uri": store.uri(key),
        "sha256": sha256,
        "threshold": card.threshold,
        "metrics": {k: v for k, v in card.metrics.items() if not isinstance(v, list)}
        | {"target_fpr": card.target_fpr},
    }
    try:
        with session.begin_nested():
            # a concurrent registration of the same bytes loses the race quietly: its row stands
            inserted = session.scalar(
                insert(Model)
                .values(**row)
                .on_conflict_do_nothing(index_elements=[Model.sha256])
                .returning(Model.version)
            )
    except IntegrityError:  # the version, taken meanwhile by other weights
        raise RegistryError(f"model version {version} already exists with other weights") from None
    model = session.scalar(
        select(Model).where(Model.sha256 == sha256).execution_options(populate_existing=True)
    )
    if inserted is None:
        _check_same_request(model, fabric_type, requested)
    return model, inserted is not None


def _loadable_card(data: bytes, name: str | Path, teacher_weights: str | Path | None) -> ModelCard:
    """The checkpoint's card, once the model it describes has been built from it as a worker
    will (teacher, student weights, memory bank, fusion) and has scored a plain tile: a
    checkpoint whose card disagrees with its contents, or that cannot score, is refused here,
    not by every worker after it was activated."""
    try:
        card = read_checkpoint(data)[0]
        if teacher_weights is not None and card.teacher_weights.startswith("wheel:"):
            raise CheckpointError(
                f"its teacher {card.teacher}'s weights come from {card.teacher_weights}, not "
                "from a local file: --teacher-weights is for a model trained on one"
            )
        verify_checkpoint(data, teacher_weights)
    except CheckpointError as exc:
        raise RegistryError(f"{name}: {exc}") from None
    return card


def _store_teacher(store: ObjectStore, card: ModelCard, teacher_weights: str | Path) -> None:
    """Store the model's teacher, packed from its local file, unless an intact copy is there."""
    key = teacher_key(card.teacher_sha256)
    if store.exists(key) and packed_teacher_sha256(store.get(key)) == card.teacher_sha256:
        return
    store.put(key, packed_teacher(card, teacher_weights))


@contextmanager
def registered_teacher(
    store: ObjectStore, model: Model, checkpoint: bytes
) -> Iterator[Path | None]:
    """The teacher stored with a model trained on a local weight file (its `checkpoint` says
    so), as a temporary file for `load_detector`; None for a teacher whose weights ship with
    rollscan — even where a stored teacher has the same weights: its copy is not this one's."""
    key = teacher_key(model.teacher_sha256)
    # the store first: a wheel teacher's model (most) has none stored, and its checkpoint is
    # not read a second time; a local file's model without one is told by the load what it lacks
    if not store.exists(key) or not _trained_on_local_file(checkpoint):
        yield None
        return
    data = store.get(key)
    if packed_teacher_sha256(data) != model.teacher_sha256:
        raise RegistryError(
            f"the teacher stored with model {model.version} ({key}) is damaged: register the "
            "model again with --teacher-weights, which restores it"
        )
    with tempfile.TemporaryDirectory(prefix="rollscan-teacher-") as folder:
        path = Path(folder) / f"{model.teacher}.safetensors"
        path.write_bytes(data)
        yield path


def _trained_on_local_file(checkpoint: bytes) -> bool:
    return read_checkpoint(checkpoint)[0].teacher_weights.startswith("file:")


def _check_same_request(existing: Model, fabric_type: str | None, requested: str | None) -> None:
    if existing.fabric_type != fabric_type or requested not in (None, existing.version):
        raise RegistryError(
            f"this checkpoint is already registered as {existing.version} "
            f"(fabric {existing.fabric_type or 'generic'})"
        )


def _store_verified(store: ObjectStore, key: str, data: bytes, sha256: str) -> None:
    """Put the checkpoint at its key unless an intact copy is there (content-addressed: a copy
    left by a failed attempt is reused; a lost or damaged one is replaced)."""
    if store.exists(key) and hashlib.sha256(store.get(key)).hexdigest() == sha256:
        return
    store.put(key, data)


def list_models(session: Session, fabric_type: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.fabric_type.nulls_first(), Model.registered_at)
    if fabric_type is not None:
        query = query.where(Model.fabric_type == fabric_type)
    return list(session.scalars(query))


def _locked_in_slot(session: Session, version: str) -> Model:
    """The model's row, read afresh and locked under its fabric slot's lock; RegistryError when
    it is unknown, or was unregistered while this waited.

    One change per slot at a time: two activations at once each stepped the other's model down
    unseen, and the second to commit broke the one-active index (a traceback, its work rolled
    back). The slot's lock comes before any row lock (the other order deadlocked two
    activations), and the row is read afresh under it: a copy loaded before (by
    `register_model`) may say "active" when another activation has stepped it down since."""
    slot = session.execute(select(Model.fabric_type).where(Model.version == version)).first()
    model = None
    if slot is not None:
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('model slot ' || :slot))"),
            {"slot": slot[0] or ""},
        )
        model = session.get(Model, version, with_for_update=True, populate_existing=True)
    if model is None:
        known = ", ".join(m.version for m in list_models(session)[-5:]) or "none registered"
        raise RegistryError(f"unknown model version {version!r} (recent: {known})")
    return model


def activate_model(session: Session, version: str, store: ObjectStore | None = None) -> Model:
    """Make `version` the active model of its fabric type (or the active generic model); with
    `store`, refused when its checkpoint is missing there (every roll of the fabric would fail)."""
    model = _locked_in_slot(session, version)
    if store is not None and not store.exists(checkpoint_key(model.sha256)):
        raise RegistryError(_missing(model))
    fabric_type = model.fabric_type  # never changes once registered
    same_slot = (
        Model.fabric_type.is_(None) if fabric_type is None else Model.fabric_type == fabric_type
    )
    session.execute(
        update(Model).where(same_slot, Model.active, Model.version != version).values(active=False)
    )
    session.flush()  # the partial unique index allows one active per slot at flush time
    if not model.active:
        model.active = True
        model.activated_at = datetime.now(UTC)
    session.flush()
    return model


def unregister_model(session: Session, version: str) -> Model:
    """Remove a model that never inspected a roll and is not active — one registered for the
    wrong fabric type, say: its checkpoint (content-addressed) is then registered anew as it
    should have been. A model with runs stays: they read its maps and threshold."""
    model = _locked_in_slot(session, version)  # as an activation takes it
    if model.active:
        raise RegistryError(
            f"{version} is the active model of fabric {model.fabric_type or 'generic'}: "
            "activate another first"
        )
    runs = session.scalar(select(func.count()).select_from(Run).where(Run.model_version == version))
    if runs:
        raise RegistryError(f"{version} has inspected rolls ({runs} runs): it stays registered")
    session.delete(model)
    session.flush()
    return model


def active_fabric_spelt_like(session: Session, fabric_type: str) -> str | None:
    """The fabric type of an active model that `fabric_type` has none of but that differs from
    it only in case: "Denim" in a manifest, where "denim" has a model, was scored by the generic
    model without a word. (Punctuation may tell two fabrics apart: "twill-2.1", "twill-21".)"""
    types = session.scalars(
        select(Model.fabric_type).where(Model.active, Model.fabric_type.is_not(None))
    ).all()
    if fabric_type in types:
        return None
    key = fabric_type.casefold()
    return next((t for t in sorted(types) if t.casefold() == key), None)


def active_model(session: Session, fabric_type: str) -> Model | None:
    """The fabric type's active model, else the active generic model, else None."""
    for condition in (Model.fabric_type == fabric_type, Model.fabric_type.is_(None)):
        model = session.scalar(select(Model).where(condition, Model.active))
        if model is not None:
            return model
    return None


def fetch_checkpoint(store: ObjectStore, model: Model) -> bytes:
    """The checkpoint's bytes, verified against the recorded sha256."""
    try:
        data = store.get(checkpoint_key(model.sha256))
    except ObjectNotFound:
        raise RegistryError(_missing(model)) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != model.sha256:
        raise RegistryError(
            f"checkpoint of model {model.version} is corrupt: sha256 {actual[:12]}… in the "
            f"store, {model.sha256[:12]}… registered"
        )
    return data


def _missing(model: Model) -> str:
    return (
        f"the checkpoint of model {model.version} (sha256 {model.sha256[:12]}…) is missing from "
        "the object store: register the same file again (`rollscan models register FILE "
        f"--fabric {model.fabric_type or '…'}`) to restore it"
    )
