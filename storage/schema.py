"""PostgreSQL schema: plain SQLAlchemy 2 declarative models, no business logic.

Every table has a natural unique key so that writers can be idempotent with
`INSERT … ON CONFLICT`: a task retried by Celery must never duplicate a row.
Constraints live in the database, not in Python, because users write SQL too.

Enumerations are text + CHECK rather than PostgreSQL ENUM types: adding a value to a
CHECK is one ALTER in a transaction; ALTER TYPE … ADD VALUE is not, and enum types
outlive the tables that used them when a downgrade forgets them.

`updated_at` is refreshed by the ORM (`onupdate`); Core `update()` statements and raw
SQL must set it themselves.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CHAR,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

# Stable constraint names so that Alembic revisions can refer to them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Roll ids and model versions become object-store keys and zarr paths
# (`rolls/<roll_id>.zarr`, `scores/<model_version>/`): no slashes, no leading dot.
SAFE_NAME_RE = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# a roll moving through the pipeline (not stalled: that one waits for its scanner)
OPEN_ROLL_STATUSES = ("registered", "ingesting", "scoring", "finalizing")
ROLL_STATUSES = (*OPEN_ROLL_STATUSES, "done", "failed", "stalled")
# how the reason of a roll (or of a reprocess run) whose work stopped without failing it begins
# (`worker.roll_rows.note_waiting`): the status says it is open, the reason why it waits
WAITING = "waiting: "
RUN_PURPOSES = ("live", "reprocess")
OPEN_RUN_STATUSES = ("pending", "scoring", "finalizing")  # a run not done, not failed
RUN_STATUSES = (*OPEN_RUN_STATUSES, "done", "failed")
BAND_STATUSES = ("pending", "done", "failed")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """The declarative base of every table: one naming convention for constraints (so that
    migrations can name what they drop) and the column types Python types map to."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        float: Double(),
        str: Text(),
        int: Integer(),
        bool: Boolean(),
    }


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Roll(Base):
    """A roll of fabric as the scanner announced it (manifest) and as far as it has been ingested;
    `status` follows it from registered to done or failed."""

    __tablename__ = "rolls"

    id: Mapped[str] = mapped_column(primary_key=True, comment="the scanner's roll code")
    fabric_type: Mapped[str]
    width_mm: Mapped[float]
    px_per_mm_x: Mapped[float] = mapped_column(comment="across the roll")
    px_per_mm_y: Mapped[float] = mapped_column(comment="along the roll")
    width_px: Mapped[int | None] = mapped_column(comment="known once the first frame is read")
    channels: Mapped[int | None] = mapped_column(SmallInteger)
    bits_per_sample: Mapped[int | None] = mapped_column(
        SmallInteger, comment="8 or 16, the frames' sample depth: known once the first is read"
    )
    rows_ingested: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    length_m: Mapped[float | None]
    frames_total: Mapped[int | None] = mapped_column(comment="from the manifest, once known")
    complete: Mapped[bool] = mapped_column(server_default=text("false"))
    status: Mapped[str] = mapped_column(server_default=text("'registered'"))
    failure_reason: Mapped[str | None]
    meta: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    source: Mapped[str | None] = mapped_column(comment="where the frames come from (S3 prefix)")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), onupdate=func.now(), nullable=False
    )
    completed_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint(f"id ~ '{SAFE_NAME_RE}'", name="id_format"),
        CheckConstraint("fabric_type <> ''", name="fabric_type_not_empty"),
        CheckConstraint("width_mm > 0", name="width_mm_positive"),
        CheckConstraint("px_per_mm_x > 0", name="px_per_mm_x_positive"),
        CheckConstraint("px_per_mm_y > 0", name="px_per_mm_y_positive"),
        CheckConstraint("width_px > 0", name="width_px_positive"),
        CheckConstraint("channels IN (1, 3)", name="channels"),
        CheckConstraint("bits_per_sample IN (8, 16)", name="bits_per_sample"),
        CheckConstraint("rows_ingested >= 0", name="rows_ingested_not_negative"),
        CheckConstraint("frames_total >= 0", name="frames_total_not_negative"),
        CheckConstraint(_in("status", ROLL_STATUSES), name="status"),
        # equality column first, then the range: "failed rolls since Monday"
        Index("ix_rolls_status_created_at", "status", "created_at"),
        Index("ix_rolls_fabric_type_created_at", "fabric_type", "created_at"),
        Index("ix_rolls_completed_at", "completed_at"),  # "rolls finished yesterday"
    )


class Frame(Base):
    """One ingested frame of a roll: where its rows start in the roll's image and the object (key
    and ETag) they came from; a changed ETag means the frame is ingested again."""

    __tablename__ = "frames"

    roll_id: Mapped[str] = mapped_column(
        ForeignKey("rolls.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(comment="object-store key of the TIFF")
    etag: Mapped[str] = mapped_column(comment="a changed ETag means re-ingest")
    row_start: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int]
    ingested_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("seq >= 0", name="seq_not_negative"),
        CheckConstraint("row_start >= 0", name="row_start_not_negative"),
        CheckConstraint("rows > 0", name="rows_positive"),
    )


class Model(Base):
    """A registered model version: its checkpoint in the object store, what it was trained with,
    its calibrated threshold and metrics; at most one is active per fabric type."""

    __tablename__ = "models"

    version: Mapped[str] = mapped_column(primary_key=True)
    fabric_type: Mapped[str | None] = mapped_column(comment="NULL: the generic (DG) model")
    variant: Mapped[str]
    teacher: Mapped[str]
    teacher_sha256: Mapped[str | None] = mapped_column(CHAR(64))
    tile: Mapped[int]
    checkpoint_uri: Mapped[str]
    sha256: Mapped[str] = mapped_column(CHAR(64), unique=True)
    threshold: Mapped[float]
    metrics: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    active: Mapped[bool] = mapped_column(server_default=text("false"))
    registered_at: Mapped[datetime] = _now()
    activated_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint(f"version ~ '{SAFE_NAME_RE}'", name="version_format"),
        # '' would collide with the generic model in the partial unique index below
        CheckConstraint("fabric_type <> ''", name="fabric_type_not_empty"),
        CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256_hex"),
        CheckConstraint("teacher_sha256 ~ '^[0-9a-f]{64}$'", name="teacher_sha256_hex"),
        CheckConstraint("tile > 0", name="tile_positive"),
        # At most one active model per fabric type, and one active generic model
        # (NULL fabric type): a plain unique index would let many NULLs through.
        Index(
            "ix_models_one_active_per_fabric_type",
            func.coalesce(text("fabric_type"), text("''")),
            unique=True,
            postgresql_where=text("active"),
        ),
    )


class Run(Base):
    """One scoring of one roll by one model version; reprocessing adds a run."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    roll_id: Mapped[str] = mapped_column(ForeignKey("rolls.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(ForeignKey("models.version", ondelete="RESTRICT"))
    purpose: Mapped[str]
    status: Mapped[str] = mapped_column(server_default=text("'pending'"))
    bands_total: Mapped[int | None]
    bands_done: Mapped[int] = mapped_column(server_default=text("0"))
    is_current: Mapped[bool] = mapped_column(server_default=text("false"))
    error: Mapped[str | None]
    created_at: Mapped[datetime] = _now()
    requested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True),
        server_default=func.now(),
        comment="when the run was last asked for (made, or asked for again by `rollscan "
        "reprocess`): of the roll's finished runs, the one asked for last is current",
    )
    finished_at: Mapped[datetime | None]
    threshold: Mapped[float | None] = mapped_column(
        comment="the score threshold finalize applied (NULL: not finalized)"
    )
    roll_threshold: Mapped[float | None] = mapped_column(
        comment="the roll's own threshold at the model's target false-alarm rate, from its "
        "tile-sized blocks of fabric (NULL: not estimated)"
    )
    stride: Mapped[int | None] = mapped_column(
        comment="the tile stride (px) every band of the run is scored at, fixed when its first "
        "bands are recorded (NULL: none yet)"
    )

    __table_args__ = (
        UniqueConstraint("roll_id", "model_version"),
        # target of the composite foreign keys of defects and grades: a defect's roll
        # can never disagree with its run's roll
        UniqueConstraint("id", "roll_id"),
        CheckConstraint(_in("purpose", RUN_PURPOSES), name="purpose"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        CheckConstraint("bands_total >= 0", name="bands_total_not_negative"),
        # the fan-in counter: counting a band twice would finalize a roll early
        CheckConstraint(
            "bands_done >= 0 AND (bands_total IS NULL OR bands_done <= bands_total)",
            name="bands_done_in_range",
        ),
        # One current run per roll; the same index answers "the current run of roll X"
        # and the join in the current_* views, so no second index is needed for that.
        Index(
            "ix_runs_one_current_per_roll",
            "roll_id",
            unique=True,
            postgresql_where=text("is_current"),
        ),
        Index("ix_runs_model_version", "model_version"),
        # `rollscan grade --since`'s "current runs finished since", and the rolls with open work
        Index("ix_runs_finished_at_current", "finished_at", postgresql_where=text("is_current")),
        Index(
            "ix_runs_open_roll_id",
            "roll_id",
            postgresql_where=text("status <> ALL (ARRAY['done'::text, 'failed'::text])"),
        ),
    )


def current_run(session: Session, roll_id: str) -> Run | None:
    """The roll's current run (the one the views show, failed or not), or None."""
    return session.scalar(select(Run).where(Run.roll_id == roll_id, Run.is_current))


class Band(Base):
    """One band of rows of a run, the unit of scoring: its rows, its status and best score, and how
    many times it was attempted."""

    __tablename__ = "bands"

    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    band_index: Mapped[int] = mapped_column(primary_key=True)
    row_start: Mapped[int] = mapped_column(BigInteger)
    row_stop: Mapped[int] = mapped_column(BigInteger, comment="exclusive")
    status: Mapped[str] = mapped_column(server_default=text("'pending'"))
    max_score: Mapped[float | None]
    attempts: Mapped[int] = mapped_column(server_default=text("0"))
    scored_at: Mapped[datetime | None]
    generation: Mapped[int] = mapped_column(
        server_default=text("0"),
        comment="raised when a changed frame sends the band back to be scored",
    )

    __table_args__ = (
        CheckConstraint("band_index >= 0", name="band_index_not_negative"),
        CheckConstraint("row_start >= 0 AND row_stop > row_start", name="rows_ordered"),
        CheckConstraint(_in("status", BAND_STATUSES), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )


class FabricExtent(Base):
    """Where the fabric lies across one block of a roll's rows, as measured from its pixels
    (`distill.fabric_region`): the columns outside it are the table, never a defect."""

    __tablename__ = "fabric_extents"

    roll_id: Mapped[str] = mapped_column(
        ForeignKey("rolls.id", ondelete="CASCADE"), primary_key=True
    )
    row_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    row_stop: Mapped[int] = mapped_column(BigInteger, comment="exclusive")
    # a block where no fabric was seen has an empty extent: left_px = right_px = 0, width_mm = 0
    left_px: Mapped[int] = mapped_column(comment="first fabric column")
    right_px: Mapped[int] = mapped_column(comment="one past the last fabric column")
    y0_mm: Mapped[float] = mapped_column(comment="rows in mm along the roll")
    y1_mm: Mapped[float]
    left_mm: Mapped[float] = mapped_column(comment="the fabric's left edge, from the image's")
    right_mm: Mapped[float]
    width_mm: Mapped[float] = mapped_column(comment="measured fabric width")
    measured_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("row_start >= 0 AND row_stop > row_start", name="rows_ordered"),
        CheckConstraint("left_px >= 0 AND right_px >= left_px", name="columns_ordered"),
        CheckConstraint("width_mm >= 0", name="width_positive"),
    )


class Defect(Base):
    """A connected component of the thresholded anomaly map; millimetres, y along the roll."""

    __tablename__ = "defects"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[int] = mapped_column(BigInteger)
    roll_id: Mapped[str]
    defect_no: Mapped[int] = mapped_column(comment="1..n along the roll, per run")
    x_mm: Mapped[float] = mapped_column(comment="centre, across from the left edge")
    y_mm: Mapped[float] = mapped_column(comment="centre, along from the roll start")
    x0_mm: Mapped[float]
    y0_mm: Mapped[float]
    x1_mm: Mapped[float]
    y1_mm: Mapped[float]
    length_mm: Mapped[float] = mapped_column(comment="longest extent (grading)")
    width_mm: Mapped[float]
    area_mm2: Mapped[float]
    max_score: Mapped[float]
    mean_score: Mapped[float]
    points: Mapped[int | None] = mapped_column(
        SmallInteger, comment="4-point system: charged in all, 1..4 per yard charged"
    )
    yards_charged: Mapped[int | None] = mapped_column(
        SmallInteger,
        comment="linear yards the defect is charged in (NULL: ignored at the selvage)",
    )

    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "roll_id"], ["runs.id", "runs.roll_id"], ondelete="CASCADE"
        ),
        UniqueConstraint("run_id", "defect_no"),
        CheckConstraint("defect_no >= 1", name="defect_no_positive"),
        CheckConstraint("x0_mm <= x1_mm AND y0_mm <= y1_mm", name="bbox_ordered"),
        CheckConstraint(
            "length_mm >= 0 AND width_mm >= 0 AND area_mm2 >= 0", name="sizes_not_negative"
        ),
        # a defect longer than a yard is charged (up to 4 points) in every yard it touches
        CheckConstraint(
            "points BETWEEN yards_charged AND 4 * yards_charged", name="points_per_yard"
        ),
        CheckConstraint("yards_charged >= 1", name="yards_charged_positive"),
        CheckConstraint("(points IS NULL) = (yards_charged IS NULL)", name="points_with_yards"),
        Index("ix_defects_roll_id_y_mm", "roll_id", "y_mm"),
    )


class Grade(Base):
    """A roll's four-point grade under one grading system, for the run it was computed from."""

    __tablename__ = "grades"

    roll_id: Mapped[str] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    system: Mapped[str] = mapped_column(primary_key=True, comment="e.g. astm_d5430")
    points: Mapped[int]
    points_per_100yd2: Mapped[float]
    grade: Mapped[str]
    yards: Mapped[float] = mapped_column(comment="length inspected")
    width_in: Mapped[float] = mapped_column(comment="cuttable width")
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    graded_at: Mapped[datetime] = _now()

    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "roll_id"], ["runs.id", "runs.roll_id"], ondelete="CASCADE"
        ),
        CheckConstraint("system <> ''", name="system_not_empty"),
        CheckConstraint("points >= 0", name="points_not_negative"),
        CheckConstraint("yards >= 0 AND width_in >= 0", name="sizes_not_negative"),
        Index("ix_grades_run_id", "run_id"),
        Index("ix_grades_graded_at", "graded_at"),  # "grades of the last week"
    )


class TaskDelivery(Base):
    """Deliveries of one task (ingest of a frame, score of a band, finalize of a run) that
    started and never ended: each one's worker died (`worker.deliveries`)."""

    __tablename__ = "task_deliveries"

    task: Mapped[str] = mapped_column(primary_key=True, comment="ingest, score or finalize")
    key: Mapped[str] = mapped_column(primary_key=True, comment="roll/frame, run/band or run")
    unfinished: Mapped[int] = mapped_column(
        server_default=text("0"),
        comment="deliveries started and never ended: their worker died",
    )
    retries: Mapped[int] = mapped_column(
        server_default=text("0"),
        comment="the Celery retry number of the message last counted (0: the first message)",
    )
    started_at: Mapped[datetime] = _now()

    __table_args__ = (CheckConstraint("unfinished >= 0", name="unfinished_not_negative"),)


class DiscoveryCursor(Base):
    """The scheduler's position in an S3 listing (StartAfter key), one row per prefix."""

    __tablename__ = "discovery_cursors"

    name: Mapped[str] = mapped_column(primary_key=True)
    cursor: Mapped[str | None]
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), onupdate=func.now(), nullable=False
    )
