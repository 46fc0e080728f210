"""The site deployment: docker-compose.yml, docker/Dockerfile, .env.example and .dockerignore.

No Docker engine runs here, so these tests read the files and hold them against the code:
every command a service runs parses with its real entry point (`cli.main.build_parser()`
for `rollscan …`, Celery's own command line with the real app for `celery -A worker.app …`),
every worker queue is one the app routes tasks to, every ROLLSCAN_* variable is a field of
`storage.settings.Settings`, and the compose file interpolates only variables that
.env.example documents.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery.app.utils import find_app
from celery.bin.base import CLIContext
from celery.bin.celery import celery
from sqlalchemy import make_url

import worker.app
from cli.main import build_parser
from storage.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
GUIDE = ROOT / "docs" / "deployment.md"

SETTINGS_VARIABLES = {f"ROLLSCAN_{name.upper()}" for name in Settings.model_fields}
# read by storage/settings.py itself (the TOML file's path), not a field
NON_FIELD_VARIABLES = {"ROLLSCAN_CONFIG"}
SECRET_NAME = re.compile(r"PASSWORD|PASS$|SECRET|TOKEN")
PLACEHOLDER = "change-me"
LONG_RUNNING_RESTART = {"always", "unless-stopped", "on-failure"}
# Celery subcommands that come from a package the images install (checked by
# test_images_install_the_plugin_commands) but that the test environment may lack
PLUGIN_COMMANDS = {"flower": "flower"}


# --------------------------------------------------------------------------- reading the files


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
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def is_ours(service: dict[str, Any]) -> bool:
    """A service built from our Dockerfile, i.e. running rollscan's code."""
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "docker/Dockerfile"


def our_services() -> list[str]:
    return sorted(name for name, service in services().items() if is_ours(service))


def one_shot_services() -> set[str]:
    """Services another one waits for to *complete*: jobs that run once and exit."""
    return {
        dependency
        for service in services().values()
        for dependency, spec in _depends_on(service).items()
        if spec.get("condition") == "service_completed_successfully"
    }


def long_running_services() -> list[str]:
    return sorted(set(services()) - one_shot_services())


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: {"condition": "service_started"} for name in depends}
    return depends


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


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "docker/Dockerfile ends inside a continued line"
    return instructions


def substitute_args(text: str, args: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced by build-arg values; unknown names stay."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


@cache
def stages() -> dict[str, dict[str, Any]]:
    """Each stage: its base (image or earlier stage) and its instructions, global ARGs resolved."""
    global_args: dict[str, str] = {}
    result: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for index, (keyword, rest) in enumerate(dockerfile()):
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            base = substitute_args(words[0], global_args)
            assert "$" not in base, f"FROM {words[0]}: a build arg without a default"
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(index)
            current = {"base": base, "instructions": []}
            result[stage_name] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current["instructions"].append((keyword, rest))
    return result


def stage_chain(name: str) -> list[str]:
    """The stage and the stages it builds on, nearest first."""
    chain = [name]
    while stages()[chain[-1]]["base"] in stages():
        chain.append(stages()[chain[-1]]["base"])
    return chain


def stage_dependencies(name: str) -> set[str]:
    """Every stage whose output ends up in `name`: its bases and what it copies from."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.add(stage)
        if stages()[stage]["base"] in stages():
            todo.append(stages()[stage]["base"])
        for keyword, rest in stages()[stage]["instructions"]:
            copied = re.search(r"--from=(\S+)", rest) if keyword == "COPY" else None
            if copied and copied.group(1) in stages():
                todo.append(copied.group(1))
    return seen


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


# --------------------------------------------------------------------------- entry points


def parse_rollscan(args: list[str]) -> Any:
    """`rollscan ARGS` parsed by the real command line; a subcommand main() dispatches."""
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`rollscan {' '.join(args)}` is not a valid rollscan command line")
    assert callable(getattr(parsed, "handler", None)), (
        f"rollscan {parsed.command}: parsed but not dispatched"
    )
    return parsed


def parse_celery(args: list[str]) -> tuple[Any, str, dict[str, Any] | None]:
    """`celery ARGS` parsed by Celery's own command line with the real app: (app, subcommand,
    the subcommand's parsed options, or None for a plugin command not installed here)."""
    context = celery.make_context("celery", list(args))
    assert context.params.get("app"), f"`celery {' '.join(args)}` names no app (-A)"
    app = find_app(context.params["app"])
    context.obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    known = set(celery.list_commands(context))
    position = next(
        (
            i
            for i, word in enumerate(args)
            if not word.startswith("-") and (i == 0 or args[i - 1] not in ("-A", "--app"))
        ),
        None,
    )
    assert position is not None, f"`celery {' '.join(args)}`: no subcommand"
    name = args[position]
    if name not in known:
        assert name in PLUGIN_COMMANDS, f"`celery {name}` is not a Celery command"
        return app, name, None
    command = celery.get_command(context, name)
    sub = command.make_context(name, list(args[position + 1 :]), parent=context)
    return app, name, sub.params


def declared_queues() -> set[str]:
    routed = {route["queue"] for route in worker.app.app.conf.task_routes.values()}
    return set(worker.app.QUEUES) | routed


def node_option(words: list[str]) -> str | None:
    for flag in ("-n", "--hostname"):
        if flag in words:
            return words[words.index(flag) + 1]
    match = next((w for w in words if w.startswith("--hostname=")), None)
    return match.split("=", 1)[1] if match else None


def check_command(words: list[str], where: str) -> tuple[str, Any]:
    """Parse a command our image runs; return (entry point, what the parser made of it)."""
    assert words, f"{where}: empty command"
    if words[0] == "rollscan":
        return "rollscan", parse_rollscan(words[1:])
    if words[0] == "celery":
        app, name, params = parse_celery(words[1:])
        assert app is worker.app.app, f"{where}: -A does not name worker.app's Celery app"
        if name == "worker":
            assert params is not None
            queues = set(params["queues"] or [])
            assert queues, f"{where}: a worker without -Q consumes only the default queue"
            unknown = queues - declared_queues()
            assert not unknown, (
                f"{where}: queues {sorted(unknown)} are not in worker.app.QUEUES or its routes "
                f"({sorted(declared_queues())})"
            )
        return f"celery {name}", params
    raise AssertionError(f"{where}: `{words[0]}` is neither `rollscan` nor `celery`")


# --------------------------------------------------------------------------- compose: commands


def test_compose_file_has_the_site_services() -> None:
    expected = {"postgres", "rabbitmq", "minio", "minio-init", "migrate", "scheduler", "flower"}
    assert expected <= set(services())
    assert {"worker-gpu", "worker-cpu"} <= set(our_services())


@pytest.mark.parametrize("name", our_services())
def test_service_command_is_a_real_entry_point(name: str) -> None:
    service = services()[name]
    assert "command" in service, f"{name}: set the command explicitly, not the image's default"
    check_command(argv(service["command"]), name)


@pytest.mark.parametrize("name", our_services())
def test_service_healthcheck_runs_a_real_entry_point(name: str) -> None:
    """A check calling `rollscan`/`celery` parses; a worker's ping names the worker's node."""
    check = services()[name].get("healthcheck") or {}
    test = check.get("test")
    if check.get("disable") or not test:
        pytest.skip(f"{name} has no health check (one-shot)")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    # compose turns $$ into $ before the container sees it
    if test[0] == "CMD-SHELL":
        words = shlex.split(interpolate(test[1], {}))
    else:
        assert test[0] == "CMD", f"{name}: healthcheck test {test[0]}"
        words = [interpolate(word, {}) for word in test[1:]]
    if words[0] not in ("rollscan", "celery"):
        return
    check_command(words, f"{name} healthcheck")
    command = argv(services()[name]["command"])
    if command[:1] == ["celery"] and "worker" in command and "ping" in words:
        node = node_option(command)
        assert node and node.endswith("@%h"), f"{name}: name the worker node NAME@%h"
        destination = words[words.index("-d") + 1] if "-d" in words else None
        assert destination == node.replace("%h", "$HOSTNAME"), (
            f"{name}: the health check pings {destination}, the worker is {node}"
        )


def test_every_queue_has_a_worker() -> None:
    consumed: set[str] = set()
    for name in our_services():
        words = argv(services()[name]["command"])
        if words[:1] == ["celery"] and "worker" in words:
            _, _, params = parse_celery(words[1:])
            consumed |= set(params["queues"])
    missing = set(worker.app.QUEUES) - consumed
    assert not missing, f"no compose worker consumes {sorted(missing)}"


def test_scheduler_runs_beat_once_and_its_check_reads_its_metrics() -> None:
    """Nightly grading needs `rollscan scheduler --beat`, in exactly one service; its health
    check reads a metric the scheduler really serves, on the port it serves it."""
    beats = []
    for name in our_services():
        words = argv(services()[name]["command"])
        if words[:2] == ["rollscan", "scheduler"]:
            parsed = parse_rollscan(words[1:])
            if parsed.beat:
                beats.append((name, parsed))
    assert len(beats) == 1, f"one scheduler with --beat, not {[name for name, _ in beats]}"
    name, parsed = beats[0]
    check = json.dumps(services()[name]["healthcheck"]["test"])
    if "/metrics" in check:
        assert parsed.metrics_port, f"{name}: the check reads /metrics, which is off"
        assert f":{parsed.metrics_port}/metrics" in check, f"{name}: check on another port"
        served = (ROOT / "scheduler" / "scheduler_metrics.py").read_text()
        for metric in re.findall(r"rollscan_[a-z_]+", check):
            assert f'"{metric}"' in served, f"{name}: the scheduler serves no {metric}"


def test_schema_is_migrated_before_our_services_start() -> None:
    migrators = [
        name
        for name in our_services()
        if argv(services()[name]["command"])[:3] == ["rollscan", "db", "upgrade"]
    ]
    assert len(migrators) == 1, f"one `rollscan db upgrade` service, not {migrators}"
    (migrate,) = migrators
    assert migrate in one_shot_services()
    for name in set(our_services()) - {migrate}:
        words = argv(services()[name]["command"])
        if words[:1] == ["celery"] and "flower" in words:
            continue  # Flower talks to the broker only
        spec = _depends_on(services()[name]).get(migrate, {})
        assert spec.get("condition") == "service_completed_successfully", (
            f"{name} must wait for {migrate} to complete"
        )


# --------------------------------------------------------------------------- compose: settings


def test_rollscan_variables_are_settings_fields() -> None:
    """Every ROLLSCAN_* name in the deployment files, comments included, is a real setting."""
    assert "ROLLSCAN_CONFIG" in (ROOT / "storage" / "settings.py").read_text()
    known = SETTINGS_VARIABLES | NON_FIELD_VARIABLES
    for path in (COMPOSE, ENV_EXAMPLE, DOCKERFILE, GUIDE):
        names = set(re.findall(r"ROLLSCAN_[A-Z0-9_]+", path.read_text()))
        unknown = names - known
        assert not unknown, f"{path.name}: {sorted(unknown)} are not rollscan settings"


@pytest.mark.parametrize("name", sorted(services()))
def test_service_environment_sets_only_settings_fields(name: str) -> None:
    environment = services()[name].get("environment") or {}
    keys = (
        [item.split("=", 1)[0] for item in environment]
        if isinstance(environment, list)
        else list(environment)
    )
    unknown = {k for k in keys if k.startswith("ROLLSCAN_")} - SETTINGS_VARIABLES
    assert not unknown, f"{name} sets {sorted(unknown)}, which are not Settings fields"


@pytest.mark.parametrize("name", our_services())
def test_service_settings_validate(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings each service would start with (a site's .env) are valid, and the service
    URLs it holds point at services of this compose file with the credentials those get:
    the database for `migrate`, the broker for Flower, all three for the pipeline's."""
    env = service_environment(name)
    needs = {"migrate": {"database"}, "flower": {"broker"}}.get(name, {"database", "broker", "s3"})
    for key in list(os.environ):
        if key.startswith("ROLLSCAN_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("ROLLSCAN_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    held = {"database": settings.database_url, "broker": settings.broker_url,
            "s3": settings.s3_endpoint}  # fmt: skip
    assert {k for k, v in held.items() if v} == needs, f"{name}: holds {held}"
    if "database" in needs:
        check_database_url(name, settings)
    if "broker" in needs:
        check_broker_url(name, settings)
    if "s3" in needs:
        endpoint = urlsplit(settings.s3_endpoint)
        assert endpoint.hostname in services(), f"{name}: {endpoint.hostname} is not a service"
        assert settings.s3_access_key_id and settings.s3_secret_access_key, f"{name}: no keys"


def check_database_url(name: str, settings: Settings) -> None:
    assert settings.database_url is not None, f"{name}: no ROLLSCAN_DATABASE_URL"
    database = make_url(settings.database_url.get_secret_value())
    assert database.drivername == "postgresql+psycopg2"
    postgres_env = service_environment(database.host)
    assert (database.username, database.password, database.database) == (
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
        postgres_env["POSTGRES_DB"],
    ), f"{name}: ROLLSCAN_DATABASE_URL does not match the {database.host} service's account"


def check_broker_url(name: str, settings: Settings) -> None:
    assert settings.broker_url is not None, f"{name}: no ROLLSCAN_BROKER_URL"
    broker = urlsplit(settings.broker_url.get_secret_value())
    assert broker.scheme in ("amqp", "pyamqp") and broker.port == 5672
    broker_env = service_environment(broker.hostname)
    assert (broker.username, broker.password) == (
        broker_env["RABBITMQ_DEFAULT_USER"],
        broker_env["RABBITMQ_DEFAULT_PASS"],
    ), f"{name}: ROLLSCAN_BROKER_URL does not match the {broker.hostname} service's account"


def test_env_example_documents_every_interpolated_variable() -> None:
    values, commented = env_example()
    for name, ops in interpolated_names(COMPOSE.read_text()).items():
        assert name in values or name in commented, f".env.example does not document {name}"
        required = ops & {"", ":?", "?"}
        assert not required or name in values, (
            f"{name} has no default in docker-compose.yml: .env.example must set it, not "
            "comment it out"
        )
    interpolate(compose(), site_env())  # raises where a ${NAME:?} would stop compose


def test_env_example_shows_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commented-out `# ROLLSCAN_X=value` lines show each setting's actual default."""
    _, commented = env_example()
    documented = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^#\s*(ROLLSCAN_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    }
    assert set(documented) <= commented
    for key in list(os.environ):
        if key.startswith("ROLLSCAN_"):
            monkeypatch.delenv(key)
    defaults = Settings()
    for variable, value in documented.items():
        actual = getattr(defaults, variable.removeprefix("ROLLSCAN_").lower())
        shown = json.loads(value) if value.startswith("[") else value  # as the env gives it
        expected = (
            list(actual) if isinstance(actual, tuple) else "" if actual is None else str(actual)
        )
        assert shown == expected, f".env.example shows {variable}={value}, the default is {actual}"


def test_guide_commands_parse() -> None:
    """Every `rollscan …` command line in docs/deployment.md's shell blocks is a real one."""
    found = 0
    for block in re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                # `rollscan` as a command: first word, or the command of a compose exec/run
                if word == "rollscan" and (i == 0 or words[i - 1] in services()):
                    parse_rollscan(words[i + 1 :])
                    found += 1
    assert found, "docs/deployment.md shows no rollscan command"


def test_env_example_ships_no_working_secret() -> None:
    """Every secret in .env.example is empty, and compose refuses to start until .env sets
    it: a placeholder that works as a credential would end up as one at some site."""
    values, _ = env_example()
    secrets = {k: v for k, v in values.items() if SECRET_NAME.search(k)}
    assert {"POSTGRES_PASSWORD", "RABBITMQ_DEFAULT_PASS", "MINIO_ROOT_PASSWORD",
            "ROLLSCAN_S3_SECRET_ACCESS_KEY", "SCANNER_S3_SECRET_ACCESS_KEY",
            "FLOWER_PASSWORD"} <= set(secrets)  # fmt: skip
    assert all(value == "" for value in secrets.values()), secrets
    used = interpolated_names(COMPOSE.read_text())
    for key in secrets:
        assert used.get(key, set()) <= {":?"} and used.get(key), (
            f"{key}: interpolate it only as ${{{key}:?…}}, so that compose refuses it empty"
        )
    with pytest.raises(AssertionError, match="compose would stop"):
        interpolate(compose(), values)


def test_site_keys_satisfy_minio() -> None:
    values = site_env()
    assert len(values["MINIO_ROOT_USER"]) >= 3
    keys = [values[k] for k in ("MINIO_ROOT_USER", "ROLLSCAN_S3_ACCESS_KEY_ID",
                                "SCANNER_S3_ACCESS_KEY_ID")]  # fmt: skip
    assert len(set(keys)) == 3, "the root user, rollscan's and the scanners' keys differ"


# what each service may hold; a service running our pipeline holds the database, the broker
# and rollscan's S3 keys
PIPELINE_SECRETS = {"POSTGRES_PASSWORD", "RABBITMQ_DEFAULT_PASS", "ROLLSCAN_S3_SECRET_ACCESS_KEY"}
OWN_SECRETS = {
    "postgres": {"POSTGRES_PASSWORD"},
    "rabbitmq": {"RABBITMQ_DEFAULT_PASS"},
    "minio": {"MINIO_ROOT_PASSWORD"},
    "minio-init": {
        "MINIO_ROOT_PASSWORD",
        "ROLLSCAN_S3_SECRET_ACCESS_KEY",
        "SCANNER_S3_SECRET_ACCESS_KEY",
    },
    "migrate": {"POSTGRES_PASSWORD"},
    "flower": {"RABBITMQ_DEFAULT_PASS", "FLOWER_PASSWORD"},
}


@pytest.mark.parametrize("name", sorted(services()))
def test_each_service_gets_only_its_own_secrets(name: str) -> None:
    secrets = {k: v for k, v in site_env().items() if SECRET_NAME.search(k)}
    environment = "\n".join(service_environment(name).values())
    held = {key for key, value in secrets.items() if value in environment}
    allowed = OWN_SECRETS.get(name, PIPELINE_SECRETS)
    assert held <= allowed, f"{name} holds {sorted(held - allowed)}, which are not its own"


@pytest.mark.parametrize("name", sorted(services()))
def test_published_ports_listen_on_loopback_as_shipped(name: str) -> None:
    values, _ = env_example()
    for port in services()[name].get("ports") or []:
        published = interpolate(port, values)
        assert published.startswith("127.0.0.1:"), f"{name} publishes {published}"


def scanner_policy() -> dict[str, Any]:
    """The scanners' MinIO policy as minio-init writes it, with .env.example's bucket."""
    script = services()["minio-init"]["command"][0]
    line = next(x for x in script.splitlines() if "scanner-policy.json" in x and "printf" in x)
    template = shlex.split(line)[1]
    values = site_env()
    bucket, incoming = values["ROLLSCAN_S3_BUCKET"], "incoming"
    return json.loads(template % (bucket, incoming))


def test_scanners_may_only_put_objects_under_the_incoming_prefix() -> None:
    (statement,) = scanner_policy()["Statement"]
    assert statement["Effect"] == "Allow"
    assert set(statement["Action"]) <= {
        "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"
    }  # fmt: skip
    bucket = site_env()["ROLLSCAN_S3_BUCKET"]
    assert statement["Resource"] == [f"arn:aws:s3:::{bucket}/incoming/*"]
    script = services()["minio-init"]["command"][0]
    assert 'attach site rollscan-scanner --user "$$SCANNER_KEY"' in script


def compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        done = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if done.returncode == 0:
            return ["docker", "compose"]
    return None


def test_a_real_compose_implementation_accepts_the_file_and_refuses_empty_secrets(
    tmp_path: Path,
) -> None:
    """`docker-compose config` (Debian's docker-compose; .ci/run installs it) parses and
    interpolates the file as a site's Docker would: no engine is needed for that."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Compose implementation installed (apt-get install docker-compose)")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if k not in site_env()}

    def config(dotenv: dict[str, str]) -> subprocess.CompletedProcess[str]:
        lines = "".join(f"{k}={v}\n" for k, v in dotenv.items())
        (tmp_path / ".env").write_text(lines)
        return subprocess.run([*binary, "config"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=False)  # fmt: skip

    shipped = config(env_example()[0])
    assert shipped.returncode != 0 and "in .env" in shipped.stderr, shipped.stderr
    site = config(site_env())
    assert site.returncode == 0, site.stderr
    resolved = yaml.safe_load(site.stdout)["services"]
    assert set(resolved) == set(services())
    for name, service in resolved.items():
        assert "env_file" not in service, name
        for port in service.get("ports") or []:
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
    secret = site_env()["ROLLSCAN_S3_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(resolved["flower"]) + json.dumps(resolved["migrate"])
    worker_env = resolved["worker-cpu"]["environment"]
    assert worker_env["ROLLSCAN_S3_SECRET_ACCESS_KEY"] == secret


# --------------------------------------------------------------------------- compose: runtime


def test_gpu_services_reserve_one_nvidia_gpu() -> None:
    gpu_services = []
    for name in our_services():
        service = services()[name]
        device = service_environment(name).get("ROLLSCAN_DEVICE", "auto")
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        ) or []
        nvidia = [d for d in devices if d.get("driver") == "nvidia"]
        if device.startswith("cuda"):
            gpu_services.append(name)
            assert len(nvidia) == 1, f"{name} runs on cuda without an nvidia device reservation"
            (reservation,) = nvidia
            assert "gpu" in reservation.get("capabilities", [])
            assert reservation.get("count") == 1 or len(reservation.get("device_ids", [])) == 1, (
                f"{name}: one GPU per worker"
            )
            assert service["build"]["target"] == "gpu", f"{name}: cuda needs the gpu image"
            words = argv(service["command"])
            assert "-c" in words and words[words.index("-c") + 1] == "1", (
                f"{name}: one process per GPU (-c 1)"
            )
        else:
            assert not nvidia, f"{name} reserves a GPU but ROLLSCAN_DEVICE is {device}"
    assert "worker-gpu" in gpu_services


def test_long_running_services_have_health_checks_and_restart() -> None:
    for name in long_running_services():
        service = services()[name]
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no health check"
        assert service.get("restart") in LONG_RUNNING_RESTART, f"{name}: no restart policy"
    for name in one_shot_services():
        assert services()[name].get("restart", "no") == "no", f"{name} runs once: restart no"


def test_dependencies_exist_and_their_conditions_can_be_met() -> None:
    one_shot = one_shot_services()
    for name, service in services().items():
        for dependency, spec in _depends_on(service).items():
            assert dependency in services(), f"{name} depends on unknown {dependency}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                check = services()[dependency].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dependency} to be healthy; it has no health check"
                )
            elif condition == "service_completed_successfully":
                assert dependency in one_shot
            else:
                assert condition == "service_started", f"{name}: condition {condition}"


def test_named_volumes_are_declared_and_hold_the_state() -> None:
    declared = set(compose().get("volumes") or {})
    used: set[str] = set()
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services().items():
        for volume in service.get("volumes") or []:
            source, target = (
                volume.split(":")[:2]
                if isinstance(volume, str)
                else (volume.get("source"), volume["target"])
            )
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
                mounts.setdefault(name, {})[target] = source
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"
    assert "/var/lib/postgresql/data" in mounts.get("postgres", {})
    assert "/var/lib/rabbitmq" in mounts.get("rabbitmq", {})
    minio_data = argv(services()["minio"]["command"])[1]
    assert minio_data in mounts.get("minio", {}), "MinIO's data directory is not a volume"


def test_broker_keeps_its_node_name() -> None:
    """RabbitMQ keeps its queues under rabbit@<hostname>: a random hostname loses them."""
    assert services()["rabbitmq"].get("hostname")


def test_third_party_images_are_pinned() -> None:
    for name, service in services().items():
        if is_ours(service):
            continue
        assert is_pinned(service["image"]), f"{name}: pin {service['image']} to a release tag"


def test_compose_builds_existing_dockerfile_targets() -> None:
    for name in our_services():
        target = services()[name]["build"].get("target")
        assert target in stages(), f"{name}: docker/Dockerfile has no stage {target}"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_with_cpu_and_gpu_targets() -> None:
    froms = [rest for keyword, rest in dockerfile() if keyword == "FROM"]
    assert len(froms) >= 2
    assert {"cpu", "gpu"} <= set(stages())


def test_dockerfile_base_images_are_pinned() -> None:
    for name, stage in stages().items():
        base = stage["base"]
        if base in stages() or base == "scratch":
            continue
        assert is_pinned(base), f"stage {name}: FROM {base} is not pinned to a release"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_runs_as_a_non_root_user(target: str) -> None:
    user = None
    for stage in reversed(stage_chain(target)):  # base first: the last USER wins
        for keyword, rest in stages()[stage]["instructions"]:
            if keyword == "USER":
                user = rest.split(":")[0]
    assert user is not None, f"{target}: no USER, the image runs as root"
    assert user not in ("root", "0"), f"{target}: USER {user}"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_default_command_and_health_check_agree(target: str) -> None:
    instructions = {k: rest for k, rest in stages()[target]["instructions"]}
    command = json.loads(instructions["CMD"])
    check_command(command, f"{target} CMD")
    check = instructions["HEALTHCHECK"]
    words = shlex.split(check.split(" CMD ", 1)[1])
    words = words[: words.index(">")] if ">" in words else words
    check_command(words, f"{target} HEALTHCHECK")
    node = node_option(command)
    assert node and words[words.index("-d") + 1] == node.replace("%h", "$HOSTNAME")


def torch_indexes(target: str) -> set[str]:
    """The index URLs that the `pip install … torch==…` steps of `target` use, ARGs resolved."""
    global_args = {}
    for keyword, rest in dockerfile():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
    urls = set()
    for stage in stage_dependencies(target):
        args = dict(global_args)
        for keyword, rest in stages()[stage]["instructions"]:
            if keyword == "ARG" and "=" in rest:
                name, _, default = rest.partition("=")
                args[name.strip()] = default.strip().strip('"')
            if keyword != "RUN":
                continue
            for step in rest.split("&&"):
                if step.strip().startswith("pip install") and "torch==" in step:
                    match = re.search(r"--index-url[ =](\S+)", step)
                    assert match, f"stage {stage}: torch installed without --index-url"
                    urls.add(substitute_args(match.group(1), args).strip("\"'"))
    return urls


def test_images_install_the_project_with_the_right_torch() -> None:
    cpu, gpu = stage_dependencies("cpu"), stage_dependencies("gpu")

    def text(names: set[str]) -> str:
        return "\n".join(
            f"{k} {rest}" for name in sorted(names) for k, rest in stages()[name]["instructions"]
        )

    assert torch_indexes("cpu") == {"https://download.pytorch.org/whl/cpu"}, "CPU build"
    assert torch_indexes("gpu"), "GPU image: no torch install found"
    assert not any("/whl/cpu" in url for url in torch_indexes("gpu")), "GPU image: CUDA build"
    assert "torch.version.cuda is None" in text(cpu), "the CPU build checks it has no CUDA"
    assert "assert torch.version.cuda" in text(gpu), "the GPU build checks it has CUDA"
    for keyword, rest in [(k, r) for name in cpu | gpu for k, r in stages()[name]["instructions"]]:
        if keyword == "RUN" and "pip install" in rest:
            assert not re.search(r"\s(-e|--editable)\s", rest), "install the project, not -e"


def test_images_install_the_plugin_commands() -> None:
    """`celery flower` exists in the images: an extra they install carries the package."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get(
        "optional-dependencies", {}
    )
    installed = set(re.findall(r"/src\[([\w,-]+)\]", DOCKERFILE.read_text()))
    names = {
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        for group in installed
        for extra in group.split(",")
        for requirement in extras.get(extra, [])
    }
    for command, package in PLUGIN_COMMANDS.items():
        if any(command in argv(services()[n]["command"]) for n in our_services()):
            assert package in names, (
                f"`celery {command}` needs {package} in the images: add it to an optional "
                f"dependency group of pyproject.toml that docker/Dockerfile installs "
                f"(it installs {sorted(installed)})"
            )


def test_dockerfile_builds_in_no_credentials() -> None:
    for keyword, rest in dockerfile():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            for variable in names:
                assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", variable.upper()), (
                    f"{keyword} {variable}: credentials come from the environment at run time"
                )


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".env", ".venv", ".git", "runs", "data"):
        assert required in patterns, f".dockerignore: add {required}"
    assert patterns & {"*.pt", "**/*.pt"}, ".dockerignore: add **/*.pt"
    assert patterns & {"__pycache__", "**/__pycache__"}, ".dockerignore: add **/__pycache__"


# --------------------------------------------------------------------------- dependencies


def test_dependencies_are_bounded_and_installed_at_the_versions_ci_tested() -> None:
    """A site installs what CI tested: `make install` and the images use constraints.txt,
    which pins every dependency (torch aside: the Makefile and the Dockerfile pin it); and a
    0.x package or a package with one release is bounded in pyproject.toml."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "deploy"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        lows = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
        upper = [s for s in requirement.specifier if s.operator in ("<", "<=", "==")]
        if any(low.startswith("0.") for low in lows) or name.startswith("efficientnet"):
            assert upper, f"pyproject.toml: bound {requirement} above (0.x or one release)"
        if name in ("torch", "torchvision") or name in PLUGIN_COMMANDS.values():
            continue  # installed by their own pinned step; Flower only in the images
        assert name in pins, f"constraints.txt has no pin for {name}: run `make constraints`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}"
        )
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dev]'" in makefile
    assert DOCKERFILE.read_text().count("-c /src/constraints.txt") == 2
