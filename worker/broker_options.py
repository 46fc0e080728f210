"""How each kind of process talks to the broker: its transport options and publish retries.

Three roles (`broker_transport_options`):
- `worker`: a worker's main process (and any other that loads the app: `celery inspect`, beat);
- `pool`: a prefork worker's pool process, which runs the tasks and sends their successors
  (set on `worker_process_init`, `worker.app`);
- `producer`: a command or the scheduler (`use_as_producer`), which consume nothing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from storage.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

Role = Literal["worker", "pool", "producer"]

REDIS_SOCKET_TIMEOUT_S = 30.0
PRODUCER_TIMEOUT_S = 10.0  # a producer's wait for each of RabbitMQ's answers (a confirm, a close)
# a message is sent again through a broker restart (about 90 s in all) rather than fail: a
# task's successor after its own work is committed, a command's frame
PUBLISH_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 1.0,
                        "interval_max": 5.0}  # fmt: skip
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def broker_transport_options(settings: Settings, role: Role = "worker") -> dict[str, Any]:
    """The broker's transport options for a process of `role`.

    Redis (every role):
    - `visibility_timeout`: Redis redelivers an unacknowledged task after it
      (ROLLSCAN_BROKER_VISIBILITY_TIMEOUT, an hour): it must exceed the longest task, a band
      takes seconds to minutes;
    - socket timeouts: a Redis that accepts and never answers (hung, or a middlebox) held a
      producer (`rollscan submit`, the scheduler) for ever, silent, and a worker logged one
      line; a blocking pop waits `polling_interval` (1 s), far below them.

    AMQP:
    - publisher confirms (`pool`, `producer`): a publish returns once RabbitMQ has the message.
      It had returned once the bytes were in the socket's buffer: while a resource alarm
      (memory, disk) blocked publishers, `rollscan submit` said "2000 frames submitted" and 24
      arrived, the roll's cursor saying all had gone. A pool process's publish waits until the
      alarm clears. Not the worker's main process: its events and control replies waiting
      there froze its loop, RabbitMQ dropped its consuming connection for missed heartbeats,
      and the running tasks were terminated and run again;
    - read and write timeouts (`producer`): a producer's wait for an answer fails after
      `PRODUCER_TIMEOUT_S`, and its publish is not tried again while the broker blocks it
      (`use_as_producer`): a command says so in about `PRODUCER_TIMEOUT_S`, not never;
    - `on_blocked` and `on_unblocked`: RabbitMQ's word that it blocks a connection's publishing
      (the alarm), logged, and the producer's ground to give up (`gave_up_while_blocked`)."""
    if not _is_amqp(settings):
        return {
            "visibility_timeout": settings.broker_visibility_timeout,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S,
        }
    options: dict[str, Any] = {"on_blocked": _note_blocked, "on_unblocked": _note_unblocked,
                               "on_open": _forget_blocked}  # fmt: skip
    if role != "worker":
        options["confirm_publish"] = True
    if role == "producer":
        options |= {"read_timeout": PRODUCER_TIMEOUT_S, "write_timeout": PRODUCER_TIMEOUT_S}
    return options


def _is_amqp(settings: Settings) -> bool:
    url = settings.broker_url.get_secret_value() if settings.broker_url else ""
    return url.split("://", 1)[0].lower() in _AMQP_SCHEMES


_blocked_at: float | None = None  # when RabbitMQ blocked this process's connection, if it does
_gave_up_blocked = False  # a publish of this process was given up while the broker blocked it


def _note_blocked(reason: str) -> None:
    global _blocked_at
    if _blocked_at is None:
        log.warning("the broker blocks publishing (%s): a RabbitMQ resource alarm, low memory or "
                    "disk (`rabbitmq-diagnostics check_alarms`); publishes wait", reason)  # fmt: skip
        _blocked_at = time.monotonic()


def _note_unblocked() -> None:
    global _blocked_at
    if _blocked_at is not None:
        blocked_s = time.monotonic() - _blocked_at
        log.warning("the broker takes publishes again after %.0f s blocked", blocked_s)
    _blocked_at = None


def _forget_blocked(connection: object = None) -> None:
    """A new connection is not blocked (yet): a producer's blocked one was dropped unanswered,
    and a later fault of another kind was taken for the alarm."""
    global _blocked_at, _gave_up_blocked
    _blocked_at, _gave_up_blocked = None, False


def gave_up_while_blocked() -> bool:
    """Whether a publish of this process was given up because RabbitMQ blocked it (its
    resource alarm): the command line's message names the alarm then."""
    return _gave_up_blocked


def _give_up_while_blocked(exc: BaseException, interval: float) -> None:
    """A producer's publish-retry errback: a publish RabbitMQ left unconfirmed while it blocks
    publishers fails now (tried again, each try cost three timeouts and sent one more copy).
    Its connection is dropped unanswered, so no `connection.unblocked` will clear the flag:
    it is cleared here, or a later broker restart was given up at once as the alarm. Each
    other failure the retries meet says that the last was not the alarm."""
    global _blocked_at, _gave_up_blocked
    _gave_up_blocked = _blocked_at is not None and isinstance(exc, TimeoutError)
    if _gave_up_blocked:
        _blocked_at = None
        raise exc


def use_as_producer(app: Celery, settings: Settings | None = None) -> None:
    """Make `app` a producer's (a command's, the scheduler's): confirmed publishes with bounded
    waits, given up while the broker blocks them. Before its first connection: options are
    read when one is made."""
    settings = settings or get_settings()
    app.conf.update(broker_transport_options=broker_transport_options(settings, "producer"),
                    task_publish_retry_policy=PRODUCER_RETRY_POLICY)  # fmt: skip
    # Celery reads the retry policy once, into the sender it caches at the first publish
    app.amqp.__dict__.pop("send_task_message", None)


PRODUCER_RETRY_POLICY = PUBLISH_RETRY_POLICY | {"errback": _give_up_while_blocked}
