"""How docker-compose.yml runs the services: GPU reservations, health checks and restart
policies, dependencies whose conditions can be met, named volumes holding the state, pinned
third-party images and Dockerfile targets that exist.
"""

from __future__ import annotations

from deployment_files import (
    argv,
    compose,
    depends_on,
    is_ours,
    is_pinned,
    long_running_services,
    one_shot_services,
    our_services,
    service_environment,
    services,
)
from dockerfile_files import stages

LONG_RUNNING_RESTART = {"always", "unless-stopped", "on-failure"}


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
        for dependency, spec in depends_on(service).items():
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
