"""Secrets and exposure in the site deployment: .env.example ships no working secret and compose
refuses to start without them, each service gets only its own, published ports listen on
loopback, the scanners may only put objects under incoming/, and a real Compose
implementation (when installed) agrees.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployment_files import (
    COMPOSE,
    SECRET_NAME,
    compose,
    env_example,
    interpolate,
    interpolated_names,
    service_environment,
    services,
    site_env,
)


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
