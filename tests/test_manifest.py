"""storage.manifest: every accepted form, every problem listed by name, nothing but Manifest
or ManifestError for any input."""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.submit import read_prefix
from storage.manifest import (
    MAX_MANIFEST_BYTES,
    NAME_PATTERN,
    Manifest,
    ManifestError,
    parse_manifest,
)
from storage.objectstore import LocalStore

GOOD: dict[str, Any] = {
    "roll_id": "R-2024.001_a",
    "fabric_type": "denim",
    "width_mm": 1600,
    "px_per_mm": 10.5,
    "frames": 12,
    "complete": True,
    "meta": {"loom": "L7", "lot": "A-17", "operator": "ana"},
}


def good(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


def problems(data: Any) -> dict[str, str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data)
    error = caught.value
    assert "Traceback" not in str(error) and "pydantic" not in str(error).lower()
    for field, reason in error.problems:
        assert f"{field}: {reason}" in str(error) or field == "manifest"
    return dict(error.problems)


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["bytes", "str", "dict", "bytes-with-bom"])
def test_input_forms(form: str) -> None:
    text = json.dumps(GOOD)
    data = {
        "bytes": text.encode(),
        "str": text,
        "dict": GOOD,
        "bytes-with-bom": b"\xef\xbb\xbf" + text.encode(),
    }[form]
    manifest = parse_manifest(data)
    assert manifest.roll_id == "R-2024.001_a" and manifest.fabric_type == "denim"
    assert manifest.width_mm == 1600.0 and isinstance(manifest.width_mm, float)
    assert (manifest.frames, manifest.complete) == (12, True)
    assert manifest.meta == GOOD["meta"]


@pytest.mark.parametrize(
    ("px", "xy"),
    [
        (10, (10.0, 10.0)),
        (12.5, (12.5, 12.5)),
        ({"x": 10, "y": 20.5}, (10.0, 20.5)),
        ([10, 20.5], (10.0, 20.5)),  # [across, along]
    ],
)
def test_px_per_mm_forms(px: Any, xy: tuple[float, float]) -> None:
    manifest = parse_manifest(good(px_per_mm=px))
    assert (manifest.px_per_mm_x, manifest.px_per_mm_y) == xy


def test_px_per_mm_as_the_models_own_fields() -> None:
    data = good(px_per_mm=...)
    data.update(px_per_mm_x=8, px_per_mm_y=9)
    assert parse_manifest(data).px_per_mm_y == 9.0


def test_defaults_and_incomplete_roll() -> None:
    manifest = parse_manifest(good(frames=..., complete=..., meta=...))
    assert (manifest.frames, manifest.complete, manifest.meta) == (None, False, {})
    assert parse_manifest(good(frames=None, complete=False, meta=None)).frames is None


def test_unknown_fields_are_kept_in_meta() -> None:
    manifest = parse_manifest(good(shift="night", speed_m_min=42.5, extra={"a": [1, 2]}))
    assert manifest.meta == {**GOOD["meta"], "shift": "night", "speed_m_min": 42.5, "extra": {"a": [1, 2]}}  # fmt: skip
    # The same value at the top level and in meta is not a conflict.
    assert parse_manifest(good(loom="L7")).meta["loom"] == "L7"


def test_round_trip_through_json_dict() -> None:
    manifest = parse_manifest(good(px_per_mm=[10, 20], note="x"))
    stored = manifest.to_json_dict()
    text = json.dumps(stored, allow_nan=False)  # zarr attrs / DB json: plain JSON
    assert parse_manifest(text) == manifest
    assert parse_manifest(stored) == manifest
    assert stored["px_per_mm"] == {"x": 10.0, "y": 20.0}
    stored["meta"]["loom"] = "changed"  # a copy: the model is not affected
    assert manifest.meta["loom"] == "L7"


def test_model_is_frozen_and_strict() -> None:
    manifest = parse_manifest(GOOD)
    with pytest.raises(ValueError):
        manifest.roll_id = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Manifest(roll_id="R1", fabric_type="d", width_mm=1, px_per_mm_x=1, px_per_mm_y=1, complete=True)  # fmt: skip


def test_name_pattern_matches_the_database_check() -> None:
    schema = pytest.importorskip("storage.schema")
    assert NAME_PATTERN == schema.SAFE_NAME_RE


# --- refused, each problem by name ----------------------------------------------------------


def test_missing_fields_listed_by_name() -> None:
    found = problems({"roll_id": "R1"})
    assert found == {"fabric_type": "required", "width_mm": "required", "px_per_mm": "required"}


def test_wrong_types_listed_by_name() -> None:
    found = problems(
        good(fabric_type=7, width_mm="1600", frames="12", complete="yes", meta=[1], px_per_mm=True)
    )
    assert found["fabric_type"] == "must be a string"
    assert found["width_mm"] == "must be a number"
    assert found["frames"] == "must be a whole number"
    assert found["complete"] == "must be true or false"
    assert found["meta"].startswith("must be an object")
    assert found["px_per_mm"].startswith("must be a number, {")
    assert set(found) == {"fabric_type", "width_mm", "frames", "complete", "meta", "px_per_mm"}


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"width_mm": 0}, "width_mm", "must be greater than 0"),
        ({"width_mm": -3.5}, "width_mm", "must be greater than 0"),
        ({"px_per_mm": 0}, "px_per_mm", "must be greater than 0"),
        ({"px_per_mm": {"x": 10, "y": -1}}, "px_per_mm.y", "must be greater than 0"),
        ({"px_per_mm": [0, 10]}, "px_per_mm.x", "must be greater than 0"),
        ({"px_per_mm": [10, 20, 30]}, "px_per_mm", "must be a number"),
        ({"px_per_mm": {"x": 10}}, "px_per_mm", "must be a number"),
        ({"px_per_mm": {"x": 1, "y": 1, "z": 1}}, "px_per_mm", "must be a number"),
        ({"px_per_mm": ["10", 20]}, "px_per_mm.x", "must be a number"),
        ({"px_per_mm_x": 10}, "px_per_mm", "not both"),
        ({"frames": 0}, "frames", "must be greater than or equal to 1"),
        ({"frames": 2**31}, "frames", "less than or equal"),
        ({"frames": 3.0}, "frames", "must be a whole number"),
        ({"frames": True}, "frames", "must be a whole number"),
        ({"complete": 1}, "complete", "must be true or false"),
        ({"frames": None, "complete": True}, "frames", "required when complete is true"),
        ({"roll_id": ""}, "roll_id", "must be 1 to 128"),
        ({"roll_id": "a" * 129}, "roll_id", "must be 1 to 128"),
        ({"roll_id": "-leading-dash"}, "roll_id", "must be 1 to 128"),
        ({"roll_id": "R1\n"}, "roll_id", "must be 1 to 128"),
        ({"roll_id": "../../etc"}, "roll_id", "must be 1 to 128"),
        ({"fabric_type": "den im"}, "fabric_type", "must be 1 to 128"),
        ({"loom": "L8"}, "loom", "given both at the top level and in meta"),
        ({"meta": {"deep": json.loads("[" * 40 + "]" * 40)}}, "meta", "nested deeper"),
    ],
)
def test_refused(changes: dict[str, Any], field: str, reason: str) -> None:
    found = problems(good(**changes))
    assert field in found, found
    assert reason in found[field]


def test_sql_injection_roll_id_refused_and_shown_escaped() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(good(roll_id="'; DROP TABLE rolls; --"))
    assert caught.value.roll_id is None
    assert caught.value.problems[0][0] == "roll_id"
    assert "DROP TABLE" in str(caught.value)  # shown (as a repr) so the operator can find it
    assert str(caught.value).startswith("manifest: roll_id: must be")


def test_error_pickles_whole() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(good(width_mm=-1))
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (str(copy), copy.problems, copy.roll_id) == (
        str(caught.value), caught.value.problems, "R-2024.001_a"
    )  # fmt: skip


def test_message_names_the_roll_when_known() -> None:
    with pytest.raises(ManifestError, match=r"^manifest of roll R-2024\.001_a: width_mm: "):
        parse_manifest(good(width_mm=-1))


def test_all_problems_at_once() -> None:
    found = problems({"roll_id": 5, "width_mm": math.inf, "px_per_mm": [1, 2], "complete": True})
    assert set(found) == {"roll_id", "fabric_type", "width_mm", "frames"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"roll"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
        (b'{"roll_id": NaN}', "NaN is not a JSON number"),
        (b'{"meta": {"a": Infinity}}', "Infinity is not a JSON number"),
        (b'{"roll_id": "a", "roll_id": "b"}', "given more than once"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"width_mm": 1e999}', "must be a finite number"),
        (json.dumps(good(meta={"x": 1e999})).replace("Infinity", "1e999").encode(), "NaN"),
        ({"roll_id": "R1", "meta": {"when": object()}}, "not a JSON value"),
        ({"roll_id": "R1", "meta": {1: "int key"}}, "keys must be strings"),
        ({"roll_id": "R1", "meta": {"nan": float("nan")}}, "NaN"),
    ],
)
def test_refused_input(data: Any, reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        parse_manifest(data)


def test_cyclic_dict_refused() -> None:
    data = good()
    data["meta"]["self"] = data["meta"]
    with pytest.raises(ManifestError, match="nested deeper"):
        parse_manifest(data)


def test_oversize_refused_before_parsing() -> None:
    filler = "x" * MAX_MANIFEST_BYTES
    for data in (json.dumps(good(note=filler)).encode(), json.dumps(good(note=filler)), good(note=filler)):  # fmt: skip
        with pytest.raises(ManifestError, match="larger than 1048576 bytes"):
            parse_manifest(data)
    # Refused on size alone: not even valid JSON, yet the size is the reported problem.
    with pytest.raises(ManifestError, match="larger than"):
        parse_manifest(b"{" * (MAX_MANIFEST_BYTES + 1))
    # Just under the limit is fine.
    base = len(json.dumps(good(note="")).encode())
    assert parse_manifest(json.dumps(good(note="x" * (MAX_MANIFEST_BYTES - base)))).meta["note"]


def test_wrong_argument_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_manifest(42)  # type: ignore[arg-type]


# --- fuzzing: Manifest or ManifestError, nothing else --------------------------------------------

FUZZ = settings(
    max_examples=200, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow]
)
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from([*GOOD, "px_per_mm_x", "px_per_mm_y", "loom", "x"]) | st.text(max_size=8)


def parses_or_refuses(data: Any) -> None:
    try:
        manifest = parse_manifest(data)
    except ManifestError as error:
        assert error.problems and all(isinstance(f, str) and r for f, r in error.problems)
        return
    assert isinstance(manifest, Manifest)
    json.dumps(manifest.to_json_dict(), allow_nan=False)
    assert parse_manifest(manifest.to_json_dict()) == manifest


@FUZZ
@given(st.dictionaries(KEYS, JSONISH, max_size=10))
def test_fuzz_dicts(data: dict[str, Any]) -> None:
    parses_or_refuses(data)
    try:
        text = json.dumps(data)
    except ValueError:
        return
    parses_or_refuses(text)


@FUZZ
@given(
    base=st.fixed_dictionaries({}, optional={k: st.just(v) for k, v in GOOD.items()}),
    changes=st.dictionaries(KEYS, JSONISH, max_size=3),
)
def test_fuzz_near_valid(base: dict[str, Any], changes: dict[str, Any]) -> None:
    parses_or_refuses({**base, **changes})


@FUZZ
@given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_fuzz_bytes(data: bytes) -> None:
    parses_or_refuses(data)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"px_per_mm": 1e-300}, "px_per_mm"),
        ({"px_per_mm": 5e-324}, "px_per_mm"),
        ({"px_per_mm": 1e12}, "px_per_mm"),
        ({"px_per_mm": {"x": 10, "y": 1e-300}}, "px_per_mm.y"),
        ({"width_mm": 1e308}, "width_mm"),
        ({"width_mm": 0.001}, "width_mm"),
        ({"width_mm": 9000, "px_per_mm": 100}, "width_mm"),  # frames 900,000 px wide
    ],
)
def test_absurd_numbers_are_refused_by_their_physical_range(change: dict, field: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({**GOOD, **change})
    assert [f for f, _ in caught.value.problems] == [field], caught.value.problems
    assert "outside" in str(caught.value) or "ROLLSCAN_MAX_FRAME_WIDTH" in str(caught.value)


def test_a_site_sets_its_own_ranges() -> None:
    from storage.manifest import ManifestLimits
    from storage.settings import Settings

    narrow = {**GOOD, "width_mm": 4.0, "px_per_mm": 300}
    with pytest.raises(ManifestError):
        parse_manifest(narrow)
    limits = ManifestLimits.from_settings(
        Settings(manifest_width_mm=(1, 100), manifest_px_per_mm=(100, 400))
    )
    assert parse_manifest(narrow, limits).px_per_mm_x == 300
    with pytest.raises(ManifestError, match=r"width_mm: 1600 is outside 1\.\.100"):
        parse_manifest(GOOD, limits)


def test_key_names_in_messages_cannot_forge_log_lines() -> None:
    forged = "x\n2026-01-01 00:00:00 INFO roll R-9 graded A\x1b[2K"
    raw = json.dumps(GOOD)[:-1] + f", {json.dumps(forged)}: 1, {json.dumps(forged)}: 2}}"
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw.encode())
    message = str(caught.value)
    assert "given more than once" in message
    assert "\n" not in message and "\x1b" not in message


class _Unread(LocalStore):
    """A store whose objects may be listed and headed, never read."""

    def get(self, key: str, **kwargs) -> bytes:
        raise AssertionError(f"{key} was read")


def test_submitting_a_prefix_refuses_an_oversized_manifest_before_reading_it(tmp_path):
    store = _Unread(tmp_path)
    store.put("incoming/R-big/manifest.json", b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestError, match="larger than 1048576 bytes"):
        read_prefix(store, "incoming/R-big")


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"loom": "L\u00007"}, "NUL character"),
        ({"\u0000": 1}, "NUL character"),
        ({"operator": "\ud800"}, "lone surrogate"),
    ],
)
def test_text_postgresql_refuses_is_refused_with_the_manifest(meta, reason) -> None:
    """jsonb refuses NUL and lone surrogates: `rollscan submit` failed with a database error
    after uploading the frames."""
    with pytest.raises(ManifestError, match=reason):
        parse_manifest(json.dumps({**GOOD, "meta": meta}))
