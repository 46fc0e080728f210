"""Brokers and real `celery worker` processes for the integration tests (a pytest plugin).

A Redis database claimed per test session (11–15) or a RabbitMQ vhost of its own; workers run
as subprocesses in their own process group (`rollscan_testing.services.Worker`, which
bench/load.py starts too) and are always stopped in teardown."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import kombu.pools
import pytest
from celery.signals import after_task_publish
from fault_servers import RabbitMQNode
from fixtures_s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REGION, make_s3_store

import worker.app
from rollscan_testing.services import Worker, purge_queues, settings_env
from storage.database import make_engine
from storage.registry import activate_model, register_model
from storage.settings import Settings
from worker.broker_options import use_as_producer
from worker.context import WorkerContext
from worker.tasks import CeleryEnqueuer

BAND = 1024  # rows per band in the workers' settings
FABRIC = "demo-twill"
REDIS, REDIS_DBS, REDIS_CLAIM = "redis://127.0.0.1:6379", range(11, 16), "rollscan-test:claim"
AMQP = "amqp://guest:guest@127.0.0.1:5672"
VISIBILITY_S = 5  # the kill test's Redis visibility timeout


# --- the process's own context, configured by the environment ------------------------------


@pytest.fixture
def env_context(monkeypatch) -> Iterator[Callable[..., None]]:
    """`use(engine_or_url, data_dir, **env)`: this process's worker context (`worker.runtime`)
    configured by the environment, as a command or an eager task builds it — the database, the
    data dir and any other ROLLSCAN_ variable set, the context built so far forgotten (its
    connections closed). The last one's connections are closed at teardown."""
    import worker.runtime

    def forget() -> None:
        if worker.runtime._context is not None:
            worker.runtime._context.engine.dispose()
        monkeypatch.setattr(worker.runtime, "_context", None)

    def use(database, data_dir: Path, **env: str) -> None:
        forget()
        url = database if isinstance(database, str) else database.url.render_as_string(False)
        monkeypatch.setenv("ROLLSCAN_DATABASE_URL", url)
        monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(data_dir))
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    yield use
    forget()


# --- brokers ---------------------------------------------------------------------------------


def _empty_redis(client, keep: str) -> None:
    keys = [key for key in client.scan_iter() if key != keep.encode()]
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def _redis_db() -> Iterator[int]:
    """A Redis database claimed for this session (SET NX), so parallel sessions never meet."""
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis does not answer on {REDIS} ({exc}): start it (scripts/services.sh)")
    token = secrets.token_hex(8)
    for db in REDIS_DBS:
        client = redis.Redis.from_url(f"{REDIS}/{db}")
        if client.set(REDIS_CLAIM, token, nx=True, ex=3600):
            break
    else:
        pytest.fail(f"Redis databases {list(REDIS_DBS)} are all claimed by other test sessions")
    try:
        yield db
    finally:
        _empty_redis(client, keep=REDIS_CLAIM)
        if client.get(REDIS_CLAIM) == token.encode():
            client.delete(REDIS_CLAIM)


@pytest.fixture
def redis_broker(_redis_db: int) -> str:
    """The claimed database, emptied: no queue, unacknowledged message or binding left over."""
    import redis

    _empty_redis(redis.Redis.from_url(f"{REDIS}/{_redis_db}"), keep=REDIS_CLAIM)
    return f"{REDIS}/{_redis_db}"


def _rabbitmqctl(*args: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    try:
        subprocess.run([ctl, *args], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[str]:
    """A vhost of our own (rabbitmqctl, deleted at the end), else the default vhost, purged."""
    from kombu import Connection

    try:
        with Connection(f"{AMQP}//", connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:
        pytest.skip(f"RabbitMQ does not answer on 127.0.0.1:5672 as guest ({exc!r})")
    vhost = f"rollscan-test-{secrets.token_hex(4)}"
    created = _rabbitmqctl("add_vhost", vhost)
    if created and not _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"):
        _rabbitmqctl("delete_vhost", vhost)
        created = False
    url = f"{AMQP}/{vhost}" if created else f"{AMQP}//"
    if not created:
        purge_queues(url)
    try:
        yield url
    finally:
        if created:
            _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def own_rabbitmq() -> Iterator[RabbitMQNode]:
    """A RabbitMQ node of the test's own, for a resource alarm (`RabbitMQNode.alarm`)."""
    node = RabbitMQNode()
    try:
        yield node
    finally:
        node.stop()


@contextmanager
def celery_producer(settings: Settings) -> Iterator[list[tuple[str, str]]]:
    """Point `worker.app.app` at the test broker (not eager); yields the (task, id) published."""
    app = worker.app.app
    keys = ("broker_url", "task_always_eager", "broker_transport_options",
            "task_publish_retry_policy")  # fmt: skip
    saved = {k: app.conf[k] for k in keys}
    published: list[tuple[str, str]] = []

    def record(sender: str | None = None, headers: dict | None = None, **_: object) -> None:
        published.append((str(sender), (headers or {}).get("id", "")))

    def drop_connections() -> None:
        # kombu keeps connection and producer pools per URL for the whole process: close them
        # all (a later test on the same URL must not be handed a closed pool) and the app's own
        kombu.pools.reset()
        app._pool = None
        app.amqp._producer_pool = None

    drop_connections()
    app.conf.update(broker_url=settings.broker_url.get_secret_value(), task_always_eager=False)
    use_as_producer(app, settings)  # as a command: confirmed publishes, bounded waits
    after_task_publish.connect(record, weak=False)
    try:
        yield published
    finally:
        after_task_publish.disconnect(record)
        drop_connections()
        app.conf.update(saved)


# --- worker processes ------------------------------------------------------------------------


@dataclass
class Stack:
    """One test's services: the settings shared by producer and workers, and its workers."""

    values: dict[str, str]
    ctx: WorkerContext
    published: list[tuple[str, str]]
    tmp: Path
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, **overrides: str) -> Worker:
        started = self.start_process(None, **overrides)
        started.wait_ready()
        return started

    def start_process(self, command: list[str] | None, **overrides: str) -> Worker:
        """A worker (`command` None) or another process with the stack's settings; stopped
        with the workers."""
        env = settings_env(self.values | overrides)
        name = f"rt{len(self.workers)}-{secrets.token_hex(3)}"
        started = Worker(name, env, self.tmp / f"worker-{name}.log", command)
        self.workers.append(started)
        return started

    def stop_workers(self) -> None:
        for started in self.workers:
            started.stop()

    def diagnosis(self) -> str:
        return "\n".join(started.tail() for started in self.workers)


@pytest.fixture
def make_stack(
    db_engine, migrated_url: str, s3_server: str, twill_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Stack]]:  # fmt: skip
    for name in [k for k in os.environ if k.startswith("ROLLSCAN_")]:
        monkeypatch.delenv(name)  # the test's settings only, in this process and the workers
    with ExitStack() as cleanup:

        def make(broker_url: str, **overrides: str) -> Stack:
            store = make_s3_store(s3_server)
            values = {
                "database_url": migrated_url, "broker_url": broker_url,
                "s3_endpoint": s3_server, "s3_bucket": store.bucket, "s3_region": REGION,
                "s3_access_key_id": FAKE_ACCESS_KEY_ID,
                "s3_secret_access_key": FAKE_SECRET_ACCESS_KEY,
                "device": "cpu", "band_height": str(BAND), "data_dir": str(tmp_path / "data"),
                **overrides,
            }  # fmt: skip
            settings = Settings(**values)
            published = cleanup.enter_context(celery_producer(settings))
            engine = db_engine
            if values["database_url"] != migrated_url:  # a server of the test's own
                engine = make_engine(values["database_url"])
                cleanup.callback(engine.dispose)
            ctx = WorkerContext(settings, engine, store, CeleryEnqueuer(), device="cpu")
            with ctx.session() as session:
                model, _ = register_model(session, store, twill_model, fabric_type=FABRIC)
                activate_model(session, model.version)
            stack = Stack(values, ctx, published, tmp_path)
            cleanup.callback(stack.stop_workers)  # first out: workers stop before the rest
            return stack

        yield make
