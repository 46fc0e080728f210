"""The roll manifest (`manifest.json` next to a roll's frames): parsed, validated, normalised.

Input contract (DESIGN.md, "Roll input contract"): `roll_id`, `fabric_type`, `width_mm`,
`px_per_mm` (one number for both axes, ``{"x": across, "y": along}`` or ``[across, along]``),
`frames` (total, once known), `complete`, free-form `meta` (loom, lot, operator). Unknown
top-level fields are kept: they move into `meta`. Everything wrong is reported at once, one
``field: reason`` per problem, so the scanner operator can fix the file in one go.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from storage.objectstore import ObjectInfo, ObjectStore

__all__ = [
    "MAX_MANIFEST_BYTES",
    "NAME_PATTERN",
    "Manifest",
    "ManifestError",
    "ManifestLimits",
    "check_manifest_size",
    "parse_manifest",
]

# Same as storage.schema.SAFE_NAME_RE (the database's check); a test keeps the two equal.
# Copied, not imported, so that reading a manifest needs no SQLAlchemy.
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_MANIFEST_BYTES = 1 << 20
# a frame's name in its roll's frames/ folder; ASCII digits: `\d` takes any script's ("٢.tif"),
# which the object store's keys refuse
FRAME_NAME = re.compile(r"^([0-9]{1,9})\.tiff?$", re.IGNORECASE)
MAX_META_DEPTH = 32  # nesting of `meta`; deeper is a broken generator, not a loom's data
_MAX_RAW_DEPTH = 100  # a dict given directly: bounded before json.dumps measures its size
_MAX_NODES = 1 << 20
MAX_FRAMES = 2**31 - 1  # `rolls.frames_total` is a PostgreSQL integer
_NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NEED_FRAMES = "required when complete is true"
_FIELDS = ("roll_id", "fabric_type", "width_mm", "px_per_mm", "frames", "complete", "meta")


class ManifestError(ValueError):
    """A manifest that cannot be used. `problems` holds (field, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]], roll_id: str | None = None) -> None:
        self.problems = problems
        self.roll_id = roll_id
        where = f"manifest of roll {roll_id}" if roll_id else "manifest"
        listed = "; ".join(
            reason if field == "manifest" else f"{_shown(field)}: {reason}"
            for field, reason in problems
        )
        super().__init__(f"{where}: {listed}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickles whole (Celery ships task exceptions)
        return (type(self), (self.problems, self.roll_id))


@dataclass(frozen=True)
class ManifestLimits:
    """Physical ranges (inclusive) for a manifest's numbers: "> 0 and finite" let through
    px_per_mm 1e-300 and width_mm 1e308, which broke grading. The defaults are
    `storage.settings.Settings`' (`ROLLSCAN_MANIFEST_WIDTH_MM`, `_PX_PER_MM`,
    `ROLLSCAN_MAX_FRAME_WIDTH`); a site sets its own there."""

    width_mm: tuple[float, float] = (10.0, 10_000.0)
    px_per_mm: tuple[float, float] = (0.5, 200.0)
    max_width_px: int = 65_536  # width_mm × px_per_mm.x: the frames' width

    @classmethod
    def from_settings(cls, settings: Any) -> ManifestLimits:
        return cls(settings.manifest_width_mm, settings.manifest_px_per_mm,
                   settings.max_frame_width)  # fmt: skip

    def problems(self, manifest: Manifest, px_field: str) -> list[tuple[str, str]]:
        found = []
        checks = [("width_mm", manifest.width_mm, self.width_mm, "ROLLSCAN_MANIFEST_WIDTH_MM")]
        for axis, value in (("x", manifest.px_per_mm_x), ("y", manifest.px_per_mm_y)):
            name = px_field if px_field == "px_per_mm" else f"px_per_mm.{axis}"
            checks.append((name, value, self.px_per_mm, "ROLLSCAN_MANIFEST_PX_PER_MM"))
        for name, value, (low, high), setting in checks:
            if not low <= value <= high:
                found.append((name, f"{value:g} is outside {low:g}..{high:g} ({setting})"))
        width_px = manifest.width_mm * manifest.px_per_mm_x
        if not found and width_px > self.max_width_px:
            found.append((
                "width_mm",
                f"× px_per_mm.x makes frames {width_px:.0f} px wide, more than "
                f"{self.max_width_px} (ROLLSCAN_MAX_FRAME_WIDTH)",
            ))  # fmt: skip
        return found


class Manifest(BaseModel):
    """A validated roll manifest. Build one with `parse_manifest`."""

    # Strict: "1600" is not a width and 1 is not `true`; a scanner that sends either has a
    # bug worth hearing about. Integers are still accepted for float fields.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    roll_id: str = Field(pattern=NAME_PATTERN)
    fabric_type: str = Field(pattern=NAME_PATTERN)
    width_mm: float = Field(gt=0, allow_inf_nan=False)
    px_per_mm_x: float = Field(gt=0, allow_inf_nan=False)  # across the roll (frame width)
    px_per_mm_y: float = Field(gt=0, allow_inf_nan=False)  # along the roll (frame rows)
    frames: int | None = Field(default=None, ge=1, le=MAX_FRAMES)
    complete: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("meta")
    @classmethod
    def _plain_json(cls, meta: dict[str, Any]) -> dict[str, Any]:
        problem = _json_problem(meta, MAX_META_DEPTH)  # it is stored as JSON (zarr attrs, DB)
        if problem:
            raise PydanticCustomError("meta_not_json", problem)
        return meta

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.complete and self.frames is None:
            raise PydanticCustomError("complete_without_frames", _NEED_FRAMES)
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON (no NaN), in the manifest's own shape: `parse_manifest` reads it back."""
        return {
            "roll_id": self.roll_id,
            "fabric_type": self.fabric_type,
            "width_mm": self.width_mm,
            "px_per_mm": {"x": self.px_per_mm_x, "y": self.px_per_mm_y},
            "frames": self.frames,
            "complete": self.complete,
            "meta": copy.deepcopy(self.meta),
        }


def parse_manifest(
    data: bytes | str | dict[str, Any], limits: ManifestLimits | None = None
) -> Manifest:
    """Parse and validate a manifest; raise `ManifestError` listing every problem.

    Bytes must be UTF-8 JSON (a BOM is tolerated) and at most `MAX_MANIFEST_BYTES`, checked
    before parsing. NaN, Infinity and duplicate keys are refused, and numbers must lie in
    `limits` (default: `ManifestLimits()`). The returned model's `meta` holds the given
    `meta` plus every unknown top-level field.
    """
    raw = _load(data)
    fields, problems = _normalise(raw)
    roll_id = _valid_name(fields.get("roll_id"))
    try:
        manifest = Manifest.model_validate(fields)
    except ValidationError as exc:
        problems += _explain(exc, px_form=raw.get("px_per_mm"))
    else:
        px_field = "px_per_mm" if isinstance(raw.get("px_per_mm"), int | float) else ""
        problems += (limits or ManifestLimits()).problems(manifest, px_field)
        if not problems:
            return manifest
    raise ManifestError(_dedupe(problems), roll_id)


# --- reading ----------------------------------------------------------------------------------


def check_manifest_size(size: int, roll_id: str | None = None) -> None:
    """Refuse a manifest of more than `MAX_MANIFEST_BYTES` — from an object's size before a byte
    of it is read, or from the data in hand."""
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError([("manifest", f"larger than {MAX_MANIFEST_BYTES} bytes")], roll_id)


def read_manifest(
    store: ObjectStore, info: ObjectInfo, limits: ManifestLimits | None = None,
    roll_id: str | None = None,
) -> Manifest:  # fmt: skip
    """The manifest object `info` describes (from a listing or a `head`): refused from its size
    before a byte of it is read, then that version read — never more than a manifest may hold —
    and parsed. ObjectChanged if the object was replaced since `info`."""
    check_manifest_size(info.size, roll_id)
    with store.open(info.key, version=info) as reader:
        return parse_manifest(reader.read(MAX_MANIFEST_BYTES + 1), limits)


def _load(data: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(data, dict):
        # Shape only here (values are the fields' business, so that a bad one is named).
        problem = _json_problem(data, _MAX_RAW_DEPTH, values=False)
        if problem:
            raise ManifestError([("manifest", problem)])
        check_manifest_size(len(json.dumps(data, ensure_ascii=False, default=repr).encode()))
        return data
    if isinstance(data, str):
        check_manifest_size(len(data))  # a character is at least one byte
        data = data.encode("utf-8", errors="surrogatepass")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, str or dict, got {type(data).__name__}")
    check_manifest_size(len(data))
    try:
        text = bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError([("manifest", f"not UTF-8 (byte {exc.start})")]) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ManifestError([("manifest", f"not valid JSON: {exc.msg} at {exc.lineno}:{exc.colno}")]) from None  # fmt: skip
    except _DuplicateKey as exc:
        raise ManifestError([(exc.key, "given more than once")]) from None
    except (ValueError, RecursionError) as exc:  # NaN / Infinity; absurd nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ManifestError([("manifest", f"not valid JSON: {reason}")]) from None
    if not isinstance(value, dict):
        raise ManifestError([("manifest", f"must be a JSON object, not {_kind(value)}")])
    return value


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys silently; which one the scanner meant is unknown.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_problem(value: Any, max_depth: int, *, values: bool = True) -> str | None:
    """Why `value` is not plain JSON (string keys, bounded nesting and size; with `values`,
    only JSON scalars and no NaN / Infinity), or None. Iterative: no recursion limit to hit,
    and a cycle shows up as too deep."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        if nodes > _MAX_NODES:
            return f"more than {_MAX_NODES} values"
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return "object keys must be strings"
            if problem := next(filter(None, map(_text_problem, item)), None):
                return problem
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
        elif not values:
            continue
        elif isinstance(item, float) and not math.isfinite(item):
            return "NaN and Infinity are not JSON"
        elif isinstance(item, str) and (problem := _text_problem(item)):
            return problem
        elif not (item is None or isinstance(item, str | int | float | bool)):
            return f"{type(item).__name__} is not a JSON value"
    return None


def _text_problem(text: str) -> str | None:
    """Text PostgreSQL's jsonb refuses — NUL, a lone surrogate — named here, not as a database
    error once the frames are uploaded."""
    if "\x00" in text:
        return "a string holds a NUL character (\\u0000)"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "a string holds a lone surrogate (not Unicode text)"
    return None


# --- normalising ------------------------------------------------------------------------------


def _normalise(raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Map the manifest's JSON onto the model's fields; unknown fields move into `meta`."""
    problems: list[tuple[str, str]] = []
    fields = {k: raw[k] for k in ("roll_id", "fabric_type", "width_mm", "frames", "complete") if k in raw}  # fmt: skip
    meta = raw.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        problems.append(("meta", f"must be an object, not {_kind(meta)}"))
        meta = {}
    meta = dict(meta)
    for key, value in raw.items():
        if key in _FIELDS or key in ("px_per_mm_x", "px_per_mm_y"):
            continue
        if key in meta and meta[key] != value:
            problems.append((key, "given both at the top level and in meta, differently"))
        meta[key] = value
    fields["meta"] = meta
    if raw.get("complete") is True and raw.get("frames") is None:
        problems.append(("frames", _NEED_FRAMES))  # also the model's rule; listed with the rest

    split = [k for k in ("px_per_mm_x", "px_per_mm_y") if k in raw]
    if "px_per_mm" in raw and split:
        problems.append(("px_per_mm", "give either px_per_mm or px_per_mm_x/_y, not both"))
    elif "px_per_mm" in raw:
        px = _px_per_mm(raw["px_per_mm"])
        if px is None:
            problems.append(("px_per_mm", _PX_FORMS))
        fields.update(px or {})
    elif split:  # the model's own names, as a database row or an older tool has them
        fields.update({k: raw[k] for k in split})
    else:
        problems.append(("px_per_mm", "required"))
    if any(reason for field, reason in problems if field == "px_per_mm"):
        fields.update(px_per_mm_x=1.0, px_per_mm_y=1.0)  # placeholders: already reported
    return fields, problems


_PX_FORMS = 'must be a number, {"x": across, "y": along} or [across, along]'


def _px_per_mm(value: Any) -> dict[str, Any] | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"px_per_mm_x": value, "px_per_mm_y": value}
    if isinstance(value, dict) and set(value) == {"x", "y"}:
        return {"px_per_mm_x": value["x"], "px_per_mm_y": value["y"]}
    if isinstance(value, list) and len(value) == 2:
        return {"px_per_mm_x": value[0], "px_per_mm_y": value[1]}
    return None


# --- explaining -------------------------------------------------------------------------------

_REASONS = {
    "missing": "required",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "int_type": "must be a whole number",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "finite_number": "must be a finite number",
    "string_pattern_mismatch": f"must be {_NAME_RULE}",
    "extra_forbidden": "unknown field",
}


def _explain(exc: ValidationError, px_form: Any) -> list[tuple[str, str]]:
    """One (field, reason) per pydantic error, in the manifest's own vocabulary."""
    scalar_px = isinstance(px_form, int | float)
    problems = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        kind = error["type"]
        field = ".".join(loc) or "manifest"
        if kind == "complete_without_frames":
            field = "frames"
        elif loc and loc[0] in ("px_per_mm_x", "px_per_mm_y"):
            field = "px_per_mm" if scalar_px else f"px_per_mm.{loc[0][-1]}"
        reason = _REASONS.get(kind, error["msg"])
        if kind == "string_pattern_mismatch":  # show the offending name, bounded and escaped
            shown = repr(error["input"])
            reason += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        if kind in ("greater_than", "less_than_equal", "greater_than_equal"):
            reason = error["msg"].replace("Input should be", "must be")
        problems.append((field, reason))
    return problems


def _dedupe(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    order = {name: i for i, name in enumerate(_FIELDS)}
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: order.get(p[0].split(".")[0], len(order)))


def _shown(field: str) -> str:
    """A field name as it may go into a message and a log line: a key the scanner chose may
    hold newlines or terminal escapes (a forged log line), so anything unusual is escaped."""
    if re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", field):
        return field
    return ascii(field[:60] + ("..." if len(field) > 60 else ""))


def _valid_name(value: Any) -> str | None:
    return value if isinstance(value, str) and re.fullmatch(NAME_PATTERN, value) else None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def frame_seq(name: str) -> int | None:
    """The frame number a name in a roll's frames/ folder gives ("000012.tif": 12); None for
    a name that is no frame's."""
    match = FRAME_NAME.fullmatch(name)  # `$` alone would let a trailing newline in
    return int(match[1]) if match else None
