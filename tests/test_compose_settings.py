"""The settings docker-compose.yml and .env.example give rollscan: every ROLLSCAN_* variable is
a field of `storage.settings.Settings`, each service's settings validate and point at services
of the file with their accounts' credentials, and .env.example documents every variable the
compose file interpolates, showing the real defaults.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import urlsplit

import pytest
from deployment_files import (
    BUILD_SCRIPT,
    COMPOSE,
    DOCKERFILE,
    ENV_EXAMPLE,
    GUIDE,
    ROOT,
    SETTINGS_VARIABLES,
    compose,
    env_example,
    interpolate,
    interpolated_names,
    our_services,
    service_environment,
    services,
    site_env,
)
from sqlalchemy import make_url

from storage.settings import OTHER_VARIABLES, Settings

# read where they are used (the TOML file's path, the reader role's password), not fields
NON_FIELD_VARIABLES = OTHER_VARIABLES


def test_rollscan_variables_are_settings_fields() -> None:
    """Every ROLLSCAN_* name in the deployment files, comments included, is a real setting."""
    assert "ROLLSCAN_CONFIG" in (ROOT / "storage" / "settings.py").read_text()
    known = SETTINGS_VARIABLES | NON_FIELD_VARIABLES
    for path in (COMPOSE, ENV_EXAMPLE, DOCKERFILE, BUILD_SCRIPT, GUIDE):
        names = set(re.findall(r"ROLLSCAN_[A-Z0-9_]+", path.read_text()))
        unknown = names - known
        assert not unknown, f"{path.name}: {sorted(unknown)} are not rollscan settings"


# set per service (ROLLSCAN_DEVICE), a path inside the image (DATA_DIR), Redis-only (the site's
# broker is RabbitMQ), or only the overlap's bound (TILE: each model scores at its own tile)
NOT_SITE_SETTINGS = {"ROLLSCAN_DEVICE", "ROLLSCAN_DATA_DIR", "ROLLSCAN_BROKER_VISIBILITY_TIMEOUT",
                     "ROLLSCAN_TILE"}  # fmt: skip


def test_every_site_setting_reaches_the_pipeline() -> None:
    """A setting a site writes in .env reaches the workers and the scheduler: the compose file
    passed on only those it names, and ROLLSCAN_PRECISION, _COMPILE_MODEL, _MERGE_GAP_MM and
    _ROLL_THRESHOLD, which README and the deployment guide recommend, were silently dropped."""
    # those the compose file builds itself (the database, broker and store's URLs) count too
    passed = set(re.findall(r"^\s+(ROLLSCAN_[A-Z0-9_]+):", COMPOSE.read_text(), re.M))
    for name in sorted(SETTINGS_VARIABLES - NOT_SITE_SETTINGS):
        assert name in passed, f"docker-compose.yml does not pass {name} on to the services"
        assert name in ENV_EXAMPLE.read_text(), f".env.example does not document {name}"


@pytest.mark.parametrize("name", sorted(services()))
def test_service_environment_sets_only_settings_fields(name: str) -> None:
    environment = services()[name].get("environment") or {}
    keys = (
        [item.split("=", 1)[0] for item in environment]
        if isinstance(environment, list)
        else list(environment)
    )
    unknown = (
        {k for k in keys if k.startswith("ROLLSCAN_")} - SETTINGS_VARIABLES - {"ROLLSCAN_CONFIG"}
    )
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
        if variable in NON_FIELD_VARIABLES:  # no default: unset, the file is not read
            assert value == "", variable
            continue
        actual = getattr(defaults, variable.removeprefix("ROLLSCAN_").lower())
        shown = json.loads(value) if value.startswith("[") else value  # as the env gives it
        expected = (
            list(actual) if isinstance(actual, tuple) else "" if actual is None else str(actual)
        )
        assert shown == expected, f".env.example shows {variable}={value}, the default is {actual}"


@pytest.mark.parametrize("name", our_services())
def test_the_site_files_the_settings_name_are_mounted_where_they_are_read(name: str) -> None:
    """ROLLSCAN_GRADING_RULES was passed to four services that could not see any file of the
    site's: each would refuse to start once it was set. A model trained but not registered was
    kept in the container's own data directory, lost when it is recreated."""
    service = services()[name]
    if "ROLLSCAN_GRADING_RULES" not in service_environment(name):
        return
    assert "./config:/etc/rollscan:ro" in (service.get("volumes") or []), name
    assert (ROOT / "config").is_dir()
    if "train" in " ".join(service.get("command") or []):
        mounted = {v.split(":")[1] for v in service["volumes"] if not v.startswith(".")}
        assert service_environment(name)["ROLLSCAN_DATA_DIR"] in mounted
