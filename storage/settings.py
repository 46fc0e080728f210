"""One settings object, read from `ROLLSCAN_*` environment variables and an optional TOML file.

Precedence: explicit arguments > environment > the TOML file named by `ROLLSCAN_CONFIG` >
defaults. Secrets are `SecretStr`: masked in repr, str and logs; only
`.get_secret_value()` reveals them, at the point of use.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Fragments of one flaw lie a few yarns apart (0.2–2 mm at 5–50 threads/cm), or where a line
# flaw's score dips below the threshold for a few mm; 10 mm bridges those with a margin, yet
# stays far under 3 in (76 mm), ASTM D5430's shortest length class, so a merge seldom changes
# a flaw's points — and two flaws within 1 cm are what an inspector marks as one.
MERGE_GAP_MM = 10.0
# kombu's transports a site may name (`celery -b`): a URL of another scheme is refused at start-up
BROKER_SCHEMES = frozenset(
    {"amqp", "amqps", "pyamqp", "redis", "rediss", "sentinel", "sqs", "memory", "filesystem"}
)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "rollscan"


class Settings(BaseSettings):
    """Every setting of a rollscan process (database, broker, object store, model, pipeline,
    limits), validated and frozen; each field is `ROLLSCAN_<FIELD>` in the environment. With
    none set, everything runs on this machine alone (embedded database, local objects)."""

    # env_ignore_empty: `ROLLSCAN_X=` (as compose passes an unset `${ROLLSCAN_X:-}`) means the
    # default, not an invalid empty value
    model_config = SettingsConfigDict(
        env_prefix="ROLLSCAN_", extra="forbid", frozen=True, env_ignore_empty=True
    )

    # services; None = the embedded default on this machine
    database_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL (postgresql+psycopg2://…)"
    )
    broker_url: SecretStr | None = Field(
        None, description="Celery broker; None runs tasks in-process"
    )
    broker_visibility_timeout: int = Field(
        3600, gt=0, description="Redis: seconds before an unacknowledged task is redelivered"
    )
    s3_endpoint: str | None = Field(
        None, description="S3-compatible endpoint URL; None = local dir"
    )
    s3_region: str = "us-east-1"
    s3_bucket: str = "rollscan"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    zarr_s3_backend: Literal["obstore", "s3fs"] = "obstore"  # measured: docs/benchmarks.md
    data_dir: Path = Field(default_factory=default_data_dir, description="embedded default's home")

    # roll geometry
    band_height: int = Field(2048, gt=0, description="rows per band (one zarr shard row)")
    tile: int = Field(256, ge=64)
    overlap: int = Field(32, ge=0)
    incoming_prefix: str = "incoming/"
    max_frame_pixels: int = Field(
        200_000_000, gt=0, description="larger frames are refused before decoding"
    )
    max_frame_width: int = Field(
        65_536, gt=0, description="wider frames are refused before decoding (pixels)"
    )
    frame_width_tolerance: float = Field(
        0.25, ge=0, le=1, description="a roll's frames may be this much wider or narrower "
        "than the manifest's width_mm × px_per_mm.x (the camera may see beside the fabric)",
    )  # fmt: skip
    # physical ranges of manifest numbers, inclusive: a scanner's bug must not reach grading
    manifest_width_mm: tuple[float, float] = Field(
        (10.0, 10_000.0), description="a roll's width_mm must lie in this range"
    )
    manifest_px_per_mm: tuple[float, float] = Field(
        (0.5, 200.0), description="px_per_mm (across and along) must lie in this range"
    )

    # worker
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    batch_size: int = Field(16, ge=1, description="tiles per model call")
    max_cached_models: int = Field(
        8, ge=1, le=256, description="models a worker keeps loaded (used last): a site whose "
        "bands interleave more model versions than this reloads a model at every band",
    )  # fmt: skip
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="scoring precision: auto (bf16 where the device has it, else "
        "fp32), fp32, bf16, or int8 (CPU only: features quantized by OpenVINO on the "
        "checkpoint's good tiles, 20 s to 2 min per model at the first band)",
    )  # fmt: skip
    compile_model: bool = Field(
        False, description="torch.compile each model once per worker process (inductor, "
        "freezing): ~1.5× the bf16 scoring rate on a CPU, for ~40 s at the first band",
    )  # fmt: skip
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads per worker process (default torch's: every core); "
        "on a CPU machine with N worker processes, cores / N",
    )  # fmt: skip

    # finalize
    merge_gap_mm: float = Field(
        MERGE_GAP_MM, ge=0, allow_inf_nan=False, description="defect components whose boxes "
        "are at most this far apart across and along (mm) are one defect (worker/components.py);"
        " 0 merges only boxes that touch or overlap",
    )  # fmt: skip

    roll_threshold: Literal["model", "max"] = Field(
        "model", description="the threshold a run applies (worker/roll_threshold.py): model = "
        "the model's calibrated one; max = the higher of it and the roll's own at the same "
        "false-alarm rate, from its tile-sized blocks of fabric (both are recorded either way)",
    )  # fmt: skip

    max_deliveries: int = Field(
        3, ge=1, description="a task that dies with its worker (killed, out of memory, a crash "
        "in a decoder) this many times fails its roll instead of being delivered again",
    )  # fmt: skip

    # control plane
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port of workers and scheduler; 0 = off"
    )
    metrics_addr: str = Field(
        "127.0.0.1", description="address /metrics listens on; 0.0.0.0 to let Prometheus in"
    )
    grade_at: str = Field(
        "02:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="nightly grading, HH:MM"
    )
    timezone: str = Field("UTC", description="IANA time zone of grade_at (e.g. Europe/Paris)")
    grading_rules: Path | None = Field(
        None, description="grading rules per fabric type (.json or .toml) for the nightly "
        "grading, `rollscan grade` and `reprocess`; unset: the built-in four-point rules",
    )  # fmt: skip

    @field_validator("database_url")
    @classmethod
    def _database_url_form(cls, value: SecretStr | None) -> SecretStr | None:
        # checked at start-up: a malformed URL was a 29-line traceback at the first query
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if value is None:
            return value
        try:
            url = make_url(value.get_secret_value())
        except (ArgumentError, ValueError):  # ValueError: int() of a port, the password's tail
            url = None
        if url is None or not url.drivername.startswith("postgresql"):  # may hold a password
            raise ValueError("not a PostgreSQL URL (postgresql+psycopg2://USER:PASSWORD@HOST/DB)")
        if "@" in (url.host or ""):
            # the password's tail was read as the host: shown by `db url` and in errors
            raise ValueError("an '@' in the password must be written %40 (percent-encoded)")
        return value

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        # `gpu`, `cuda:x` or `cpu ` started a healthy worker that failed every roll at its first
        # band
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", value):
            raise ValueError(f"not a device: {value!r} (auto, cpu, cuda or cuda:N)")
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_form(cls, value: str | None) -> str | None:
        # `minio:9000` started a healthy worker that failed every roll at ingest, and a
        # scheduler that logged a traceback each pass
        parts = urlsplit(value) if value is not None else None
        if parts is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            # not echoed: an endpoint may carry credentials (http://KEY:SECRET@HOST)
            raise ValueError("not an endpoint URL (http://HOST:PORT or https://…)")
        return value

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_form(cls, value: str) -> str:
        # "rollscan " (a trailing space from a .env file) was sent to S3 as is: every request
        # failed at the first frame, far from the setting
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]", value):
            raise ValueError(
                f"not a bucket name: {value!r} (letters, digits, '.', '-' and '_', 3 to 255, "
                "starting and ending with a letter or digit)"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_form(cls, value: SecretStr | None) -> SecretStr | None:
        # "localhost:6379" read as a broker that is down (exit 3), "http://…" a KeyError
        if value is None:
            return value
        if value.get_secret_value().partition("://")[0] not in BROKER_SCHEMES:
            raise ValueError(
                f"not a broker URL: want {', '.join(sorted(BROKER_SCHEMES))}://… (redis://HOST:6379/0)"
            )
        try:  # kombu reads '/', '#' or '?' in a password as the URL's end: its port error
            for url in value.get_secret_value().split(";"):  # quoted the password's first part
                _ = urlsplit(url.strip()).port  # ';' separates failover brokers, as kombu's
        except ValueError:
            raise ValueError(
                "not a broker URL: its port is not a number; a '/', '#', '?' or '@' in the "
                "password must be percent-encoded (%2F, %23, %3F, %40)"
            ) from None
        return value

    @field_validator("band_height")
    @classmethod
    def _band_is_whole_chunks(cls, value: int) -> int:
        if value % 256:
            raise ValueError(
                f"band_height must be a multiple of 256 (zarr chunk rows), not {value}"
            )
        return value

    @field_validator("manifest_width_mm", "manifest_px_per_mm")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"must be [low, high] with 0 < low <= high, finite; got {value}")
        return value

    @field_validator("incoming_prefix")
    @classmethod
    def _incoming_is_a_prefix(cls, value: str) -> str:
        from storage.objectstore import dir_prefix  # it reads settings: imported when used

        dir_prefix(value)  # refused at start-up, not by every discovery pass
        return value

    @field_validator("grading_rules")
    @classmethod
    def _rules_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"grading rules file {value} does not exist")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name such as Europe/Paris)"
            ) from None
        return value

    @model_validator(mode="after")
    def _overlap_fits_tile(self) -> Settings:
        # at most half: the pipeline clamps a model's overlap there (its map keeps each tile's
        # interior), so a larger one was used as half the tile without a word
        if self.overlap > self.tile // 2:
            raise ValueError(
                f"overlap {self.overlap} must be at most half the tile ({self.tile // 2})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("ROLLSCAN_CONFIG")
        if path:
            if not Path(path).is_file():
                raise ValueError(f"ROLLSCAN_CONFIG names {path}, which is not a file")
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            except tomllib.TOMLDecodeError as exc:  # its words alone name neither file nor setting
                raise ValueError(f"ROLLSCAN_CONFIG {path} is not valid TOML: {exc}") from None
        return tuple(sources)

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    def describe(self) -> dict[str, Any]:
        """Settings for display: secrets masked (pydantic prints SecretStr as '**********')."""
        return {k: (str(v) if v is not None else None) for k, v in self.model_dump().items()}


class SettingsError(ValueError):
    """Invalid settings; the message names the fields, never a value that may be secret."""


# ROLLSCAN_* variables that are no setting but are read where they are used
OTHER_VARIABLES = frozenset(
    {"ROLLSCAN_CONFIG", "ROLLSCAN_READER_PASSWORD", "ROLLSCAN_TEST_PG_ADMIN_URL"}
)
_said_unknown: set[str] = set()


def get_settings(**overrides: Any) -> Settings:
    """The settings, validated; an error names each setting as a field and as its variable.
    A `ROLLSCAN_*` variable that is no setting (`ROLLSCAN_TIMEZONE_`) is warned about, once a
    process, with the setting it may have meant: it was ignored without a word."""
    _warn_unknown_variables()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{_named(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid rollscan settings: {problems}") from None


def _named(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "settings"
    field = ".".join(map(str, loc))
    return f"{field} (ROLLSCAN_{str(loc[0]).upper()})" if loc[0] in Settings.model_fields else field


def _warn_unknown_variables() -> None:
    known = {f"ROLLSCAN_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    for name in sorted(os.environ):
        upper = name.upper()
        if upper.startswith("ROLLSCAN_") and upper not in known and name not in _said_unknown:
            _said_unknown.add(name)
            close = difflib.get_close_matches(upper, sorted(known), n=1)
            logging.getLogger(__name__).warning(
                "%s is no rollscan setting: ignored%s", name,
                f" (did you mean {close[0]}?)" if close else "",
            )  # fmt: skip
