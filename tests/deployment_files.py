"""The site deployment's files as the deployment tests read them: docker-compose.yml (PyYAML,
then compose's own rules: interpolation, `depends_on` and `environment` in either form) and
.env.example. The image build (docker/Dockerfile, its build script, .dockerignore) is read by
`dockerfile_files`.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from storage.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_SCRIPT = ROOT / "docker" / "build_env.sh"
GUIDE = ROOT / "docs" / "deployment.md"

SETTINGS_VARIABLES = {f"ROLLSCAN_{name.upper()}" for name in Settings.model_fields}
SECRET_NAME = re.compile(r"PASSWORD|PASS$|SECRET|TOKEN")


# --------------------------------------------------------------------------- docker-compose.yml


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


@cache
def env_example() -> tuple[dict[str, str], set[str]]:
    """(the KEY=value lines, the names of the commented-out `# KEY=value` lines)."""
    values: dict[str, str] = {}
    commented: set[str] = set()
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if not match:
            assert not re.match(r"[A-Za-z_]", line), f".env.example:{number}: not KEY=value"
            continue
        key, value = match.group(2), match.group(3)
        if match.group(1):
            commented.add(key)
            continue
        assert key not in values, f".env.example:{number}: {key} set twice"
        values[key] = value
    return values, commented


# `$$` is a literal dollar; `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`,
# `${NAME?error}`, `${NAME:+alt}`, `${NAME+alt}` and `$NAME` are compose's interpolation
VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolated_names(text: str) -> dict[str, set[str]]:
    """Each variable the compose file interpolates, with the operators it is used with."""
    found: dict[str, set[str]] = {}
    for match in VARIABLE.finditer(text):
        name = match.group("name") or match.group("bare")
        if name:
            found.setdefault(name, set()).add(match.group("op") or "")
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The compose file's value with `env` substituted, as `docker compose config` would."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op") or "", match.group("arg") or ""
        present = name in env and (env[name] != "" or not op.startswith(":"))
        if op.endswith("-"):
            return env[name] if present else arg
        if op.endswith("+"):
            return arg if present else ""
        if op.endswith("?") and not present:
            raise AssertionError(f"compose would stop: {name}: {arg}")
        return env.get(name, "")

    return VARIABLE.sub(substitute, value)


def argv(command: str | list[str]) -> list[str]:
    """A compose `command` (or health check) as its words: a string is split as the shell would."""
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def is_ours(service: dict[str, Any]) -> bool:
    """A service built from our Dockerfile, i.e. running rollscan's code."""
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "docker/Dockerfile"


def our_services() -> list[str]:
    return sorted(name for name, service in services().items() if is_ours(service))


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's dependencies in the long form, the short list form expanded."""
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: {"condition": "service_started"} for name in depends}
    return depends


def one_shot_services() -> set[str]:
    """Services another one waits for to *complete*: jobs that run once and exit."""
    return {
        dependency
        for service in services().values()
        for dependency, spec in depends_on(service).items()
        if spec.get("condition") == "service_completed_successfully"
    }


def long_running_services() -> list[str]:
    return sorted(set(services()) - one_shot_services())


@cache
def site_env() -> dict[str, str]:
    """.env as a site writes it: .env.example with every empty secret filled in (each with a
    value of its own, so that a test can tell which secret reached which service)."""
    values, _ = env_example()
    return {k: v or f"filled-{k.lower().replace('_', '-')}-0123" for k, v in values.items()}


def service_environment(name: str) -> dict[str, str]:
    """The environment compose gives the container, with `site_env()` standing in for .env."""
    service = services()[name]
    assert not service.get("env_file"), f"{name}: env_file would hand it every secret of .env"
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    values = site_env()
    return {k: str(interpolate(v, values)) for k, v in environment.items() if v is not None}


def is_pinned(image: str) -> bool:
    """A tag naming a release (a digest is pinned too): not `latest`, not a bare major."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    floating = re.fullmatch(r"\d+(-[a-z][a-z0-9]*)*", tag)  # `16`, `16-bookworm`
    return bool(re.search(r"\d", tag)) and "latest" not in tag and not floating
