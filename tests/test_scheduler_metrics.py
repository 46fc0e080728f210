"""The control plane's Prometheus metrics: the scheduler's /metrics serves the metric names,
listens on loopback unless told, and asks the broker for queue depths.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client import REGISTRY

from rollscan_testing.services import free_port
from scheduler.scheduler_metrics import SchedulerMetrics, queue_depths, start_metrics_server
from storage.settings import Settings


def test_the_metrics_endpoint_serves_the_metric_names(rec):
    SchedulerMetrics(queues=()).update(rec)
    port = free_port()
    server = start_metrics_server(port, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    for name in ("rollscan_tiles_scored_total", "rollscan_bands_in_flight",
                 "rollscan_roll_latency_seconds_bucket", "rollscan_rolls{status=\"done\"}",
                 "rollscan_frames_enqueued_total", "rollscan_scheduler_last_pass_timestamp_seconds",
                 "rollscan_rolls_idle"):  # fmt: skip
        assert name in text, name
    assert "# TYPE rollscan_queue_depth gauge" in text


def test_metrics_listen_on_loopback_unless_told() -> None:
    """The scheduler's and the workers' /metrics name rolls and queues: not for the LAN."""
    import psutil

    from worker.task_metrics import serve_metrics

    server = start_metrics_server(free_port())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
    port = serve_metrics(free_port())
    listening = {
        c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"}
    assert Settings().metrics_addr == "127.0.0.1"


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/10", "amqp://guest:guest@127.0.0.1:5672//"])  # fmt: skip
def test_queue_depth_is_asked_of_the_broker(broker):
    import uuid

    from kombu import Connection, Exchange, Queue

    name = f"rollscan-test-{uuid.uuid4().hex[:8]}"
    try:
        # read/write timeouts: under RabbitMQ's disk alarm the queue's delete below (and the
        # close after it) waited for ever, and CI with it
        conn = Connection(broker, connect_timeout=2,
                          transport_options={"read_timeout": 10, "write_timeout": 10})  # fmt: skip
        conn.ensure_connection(max_retries=1, interval_start=0)
    except Exception as exc:
        pytest.skip(f"no broker at {broker}: {exc}")
    queue = Queue(name, Exchange(name), routing_key=name)
    with conn:
        producer = conn.Producer()
        for i in range(3):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue])
        try:  # RabbitMQ counts a message once it is routed: give the publishes a moment
            deadline, depths = time.monotonic() + 5, {}
            while depths.get(name) != 3 and time.monotonic() < deadline:
                depths = queue_depths(broker, (name, f"{name}-absent"))
            assert depths == {name: 3, f"{name}-absent": 0}
        finally:
            queue(conn.default_channel).delete()
    metrics = SchedulerMetrics(queues=(name,))
    metrics._from_broker(f"redis://127.0.0.1:{free_port()}/0")  # down: NaN, no exception
    value = REGISTRY.get_sample_value("rollscan_queue_depth", {"queue": name})
    assert value != value  # NaN


def test_a_metrics_port_a_worker_took_first_is_named(db_engine, tmp_path) -> None:
    """Workers move to the next free port; the scheduler died with `[Errno 98] Address already
    in use`, naming neither the port nor the setting."""
    import os
    import subprocess
    import sys

    from worker.task_metrics import serve_metrics

    port = free_port()
    assert serve_metrics(port) == port  # a worker on this host, started first
    with pytest.raises(ValueError, match=rf"metrics port 127.0.0.1:{port} \(ROLLSCAN_METRICS_PORT"):
        start_metrics_server(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSCAN_")}
    env |= {"ROLLSCAN_DATABASE_URL": db_engine.url.render_as_string(False),
            "ROLLSCAN_DATA_DIR": str(tmp_path), "ROLLSCAN_METRICS_PORT": str(port)}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cli", "scheduler"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ROLLSCAN_METRICS_PORT" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_redis_that_never_answers_is_given_up(monkeypatch) -> None:
    """A Redis that accepts and never answers (hung, or a middlebox) held the scheduler's loop —
    its queue depths after every pass, its discovery with them — and a producer (`rollscan
    submit`) for ever, silent: the socket timeouts give both up with an error."""
    import socket
    import threading

    from kombu.exceptions import OperationalError

    import worker.app
    import worker.broker_options

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        accepted: list = []
        threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
        broker = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        with pytest.raises(Exception, match="Timeout"):
            queue_depths(broker, ("score",), timeout=2.0)
        monkeypatch.setattr(worker.broker_options, "REDIS_SOCKET_TIMEOUT_S", 2.0)
        app = worker.app.make_app(Settings(broker_url=broker))
        with app.connection_for_write() as conn, pytest.raises(OperationalError, match="Timeout"):
            conn.ensure_connection(max_retries=1, interval_start=0)


def test_a_metrics_address_the_host_lacks_is_named_not_searched_for_a_port() -> None:
    """ROLLSCAN_METRICS_ADDR=not-an-addr: a worker said "no free port in 9378..9393", and the
    operator looked for the processes holding them."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(); from worker.task_metrics import serve_metrics;"
            f" print(serve_metrics({free_port()}, addr='not-an-addr'))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.stdout.strip() == "None", done.stderr[-2000:]
    assert "cannot listen on not-an-addr" in done.stderr and "ROLLSCAN_METRICS_ADDR" in done.stderr
    assert "no free port" not in done.stderr
