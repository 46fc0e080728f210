"""What docker-compose.yml's services of our image run, and the commands docs/deployment.md
shows: every command parses with its real entry point (tests/deployment_commands.py), every
worker queue has a consumer, one scheduler runs the beat, and the schema is migrated first.

No Docker engine runs here: the tests read the files and hold them against the code.
"""

from __future__ import annotations

import json
import logging
import re
import shlex

import pytest
from deployment_commands import check_command, node_option, parse_celery, parse_rollscan
from deployment_files import (
    GUIDE,
    ROOT,
    argv,
    depends_on,
    interpolate,
    one_shot_services,
    our_services,
    services,
)

import worker.app


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
        spec = depends_on(services()[name]).get(migrate, {})
        assert spec.get("condition") == "service_completed_successfully", (
            f"{name} must wait for {migrate} to complete"
        )


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


def test_every_worker_logs_at_info() -> None:
    """Celery's default level is WARNING: the workers' logs showed nothing of a roll scored and
    finalized, nor the lines docs/deployment.md quotes for the operator."""
    for name in our_services():
        words = argv(services()[name]["command"])
        if words[:1] == ["celery"] and "worker" in words:
            _, _, params = parse_celery(words[1:])
            assert params["loglevel"] == logging.INFO, name
