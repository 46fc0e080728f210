"""A site's four-point grading rules: the built-in defaults, a rules file (JSON or TOML) that
overrides them for all fabrics (`default`) and per fabric type (`fabric_types`), validated once
when read.

Graders accept or reject rolls by these numbers, so nothing a file says may be read as something
else: unknown or repeated keys, a `true` where a number belongs, a number in quotes, points that
fall as defects grow longer, an empty file — each is refused with the place it was found.
A roll whose fabric type has no section is graded on the default rules; `RuleBook.section` says
which section applied (recorded with each grade) and `RuleBook.near_miss` names a section that
differs from the fabric type only in case, spaces or punctuation (a typo, warned about).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# float noise (76.2 mm / 25.4 is not exactly 3.0): never enough to move a real boundary
FLOAT_NOISE = 1e-9
MAX_SELVAGE_MARGIN_IN = 12.0  # a foot each side: beyond it the "selvage" is the fabric
DEFAULT_SECTION = "default"

# the single-number rules: field -> (lowest, highest, both allowed; what the rule says)
_RANGES = {
    "points_above": (1, 4, "points must be 1..4 (the four-point system)"),
    "max_points_per_yard": (1, math.inf, "must be at least 1"),
    "width_tolerance": (0, 1, "must be a share between 0 and 1"),
    "selvage_margin_in": (0, MAX_SELVAGE_MARGIN_IN, f"must be 0..{MAX_SELVAGE_MARGIN_IN:g} in"),
}


class GradingRules(BaseModel):
    """Four-point rules for one fabric type. Unknown keys are refused (a misspelt limit
    must not silently fall back to the default), and types are strict: JSON's `true` is not
    the number 1, nor "4" the number 4."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # (max length in inches, inclusive; points), ascending; longer than the last: points_above
    point_bands: tuple[tuple[float, int], ...] = ((3.0, 1), (6.0, 2), (9.0, 3))
    points_above: int = 4
    max_points_per_yard: int = 4
    selvage_margin_in: float = 1.0
    # the measured fabric width replaces the manifest's when they differ by more than this
    # share of the manifest's (a scanner's manifest is typed in; the pixels are not)
    width_tolerance: float = 0.05
    # (grade name, max points per 100 yd², inclusive), ascending limits
    acceptance: tuple[tuple[str, float], ...] = (("A", 20.0), ("B", 40.0))
    reject_name: str = "reject"

    @field_validator("point_bands")
    @classmethod
    def _bands_ascend(cls, bands: tuple[tuple[float, int], ...]) -> tuple[tuple[float, int], ...]:
        limits = [limit for limit, _ in bands]
        if not bands:
            raise ValueError("needs at least one (inches, points) band")
        if (
            any(b <= a for a, b in pairwise(limits))
            or any(x <= 0 for x in limits)
            or not all(map(math.isfinite, limits))  # NaN compares false: a band never taken
        ):
            raise ValueError(f"band limits must be positive and ascending, got {limits}")
        points = [pts for _, pts in bands]
        if any(not 1 <= pts <= 4 for pts in points):
            raise ValueError("band points must be 1..4 (the four-point system)")
        if any(b < a for a, b in pairwise(points)):
            raise ValueError(f"band points must not fall as defects grow longer, got {points}")
        return bands

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, value: float, info: ValidationInfo) -> float:
        low, high, rule = _RANGES[info.field_name]
        if not low <= value <= high:  # NaN and infinities too
            raise ValueError(f"{rule}, got {value}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> GradingRules:
        if self.points_above < self.point_bands[-1][1]:
            raise ValueError(
                f"points_above ({self.points_above}) must not be less than the longest band's "
                f"points ({self.point_bands[-1][1]}): a longer defect never scores less"
            )
        names = [name for name, _ in self.acceptance]
        limits = [limit for _, limit in self.acceptance]
        if not names:
            raise ValueError("acceptance needs at least one (grade, limit)")
        if any(not n for n in names) or not self.reject_name:
            raise ValueError("grade names must not be empty")
        if len(set(names) | {self.reject_name}) != len(names) + 1:
            raise ValueError(f"grade names must be distinct, got {[*names, self.reject_name]}")
        if (
            any(b <= a for a, b in pairwise(limits))
            or limits[0] < 0
            or not all(map(math.isfinite, limits))  # NaN compares false: a grade never given
        ):
            raise ValueError(f"acceptance limits must be ascending and ≥ 0, got {limits}")
        return self

    def points_for(self, length_in: float) -> int:
        for limit, points in self.point_bands:
            if length_in <= limit + FLOAT_NOISE:
                return points
        return self.points_above

    def grade_for(self, points_per_100yd2: float) -> str:
        for name, limit in self.acceptance:
            if points_per_100yd2 <= limit + FLOAT_NOISE:
                return name
        return self.reject_name


_CONFIG_KEYS = {"default", "fabric_types"}


class RuleBook:
    """A site's rules, validated once: ``book(fabric_type)`` gives a fabric type's rules.

    `config` is a dict as read from JSON or TOML::

        {"default": {"max_points_per_yard": 4},
         "fabric_types": {"denim": {"acceptance": [["first", 15], ["second", 30]],
                                     "reject_name": "third"}}}

    The built-in defaults, overridden key by key by ``config["default"]``, then by the fabric
    type's section. Unknown keys anywhere, and invalid values, raise ValueError naming the
    place. Every section is validated here, not only the ones asked for, so that a typo in
    another fabric's rules is found by the first grading, not by the night that needs it."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        config = {} if config is None else config
        if not isinstance(config, Mapping):
            raise ValueError(f"grading config must be a table/object, not {type(config).__name__}")
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise ValueError(
                f"grading config: unknown key(s) {sorted(unknown)}; expected {sorted(_CONFIG_KEYS)}"
            )
        default = _table(config.get("default", {}), "default")
        fabrics = _table(config.get("fabric_types", {}), "fabric_types")
        self.default = _rules(default, "default")
        self.fabrics = {
            name: _rules({**default, **_table(overrides, f"fabric_types.{name}")},
                         f"fabric_types.{name}")
            for name, overrides in fabrics.items()
        }  # fmt: skip

    def __call__(self, fabric_type: str) -> GradingRules:
        return self.fabrics.get(fabric_type, self.default)

    def section(self, fabric_type: str) -> str:
        """The section that grades `fabric_type`: "fabric_types.NAME", or "default"."""
        return f"fabric_types.{fabric_type}" if fabric_type in self.fabrics else DEFAULT_SECTION

    def near_miss(self, fabric_type: str) -> str | None:
        """A section that `fabric_type` has none of but that differs from it only in case,
        spaces or punctuation: "Denim-12 oz" written for rolls of "denim-12oz"."""
        if fabric_type in self.fabrics:
            return None
        key = _loose(fabric_type)
        return next((name for name in self.fabrics if _loose(name) == key), None)


def _loose(name: str) -> str:
    return re.sub(r"[\W_]+", "", name.casefold())


def load_rules(fabric_type: str, config: Mapping[str, Any] | None = None) -> GradingRules:
    """The rules for `fabric_type` under `config` (see `RuleBook`; None: the built-in rules)."""
    return RuleBook(config)(fabric_type)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"grading config {where}: expected a table/object, not {value!r}")
    return dict(value)


def _plain(value: Any) -> Any:
    # JSON and TOML have only lists (strict validation takes a pair as a tuple), and write 4
    # as 4.0 as readily (a number a strict integer field refused, where 4.5 still is)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _rules(values: dict[str, Any], where: str) -> GradingRules:
    try:
        return GradingRules(**{key: _plain(value) for key, value in values.items()})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'rules'}: "
            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise ValueError(f"grading config {where}: {problems}") from None


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys: a fabric written twice lost its first section
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def read_rules_file(path: Path) -> dict[str, Any]:
    """The grading config in a JSON or TOML file; ValueError with the file's name if unreadable,
    repeating a key, or empty (a file truncated by a deploy must not mean the built-in rules)."""
    try:
        if path.suffix.lower() == ".toml":
            with path.open("rb") as f:
                config = tomllib.load(f)
        else:
            config = json.loads(
                path.read_text(encoding="utf-8"), object_pairs_hook=_no_repeated_keys
            )
    except (ValueError, UnicodeDecodeError) as exc:  # JSON's and TOML's errors are ValueErrors
        raise ValueError(f"grading rules {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"grading rules {path}: expected an object at the top")
    if not config:
        raise ValueError(f"grading rules {path}: empty; expected 'default' and/or 'fabric_types'")
    return config


def rules_from_file(path: Path | None) -> RuleBook:
    """The site's rules from a rules file (None: the built-in rules), read and validated here,
    so that a bad file fails before anything is graded or written."""
    if path is None:
        return RuleBook()
    config = read_rules_file(path)
    try:
        return RuleBook(config)
    except ValueError as exc:
        raise ValueError(f"grading rules {path}: {exc}") from None
