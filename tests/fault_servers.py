"""Servers a fault test may stop and start again, or break: a Redis of its own, a TCP relay, and
a RabbitMQ node of its own.

The session's shared services (PostgreSQL on 5432, Redis on 6379, the moto S3 server) are
never stopped: other test sessions may be using them. A fault test restarts a server of its
own instead, or cuts the relay its workers reach a shared one through. Their free ports come
from `rollscan_testing.services.free_port`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from rollscan_testing.services import free_port


def wait_for_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{what} does not answer on 127.0.0.1:{port} after {timeout}s")
            time.sleep(0.1)


class RedisServer:
    """`redis-server` on a free loopback port with an append-only file in `folder`, so that a
    restart keeps the queues, as a production broker's configuration must (docs/deployment.md).
    """

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary, self.folder, self.port = binary, folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
             str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_for_port(self.port, 30, "the test's redis-server")

    def stop(self) -> None:
        """SHUTDOWN as an operator's restart does: the append-only file is flushed first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import redis

        with suppress(redis.ConnectionError):  # it closes the connection as it exits
            redis.Redis(port=self.port).shutdown()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TcpRelay:
    """A loopback TCP relay to `target_port`. `cut()` closes the listening socket and every
    open connection (clients get "connection refused" and reset, as from a server that went
    away); `restore()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR is set
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            source.settimeout(None)
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class RabbitMQNode:
    """A RabbitMQ node of the test's own (`rabbitmq-server` on free loopback ports, its files in a
    folder of its own), whose resource alarm the test raises: the shared node's would block
    every other test's publishers, and a test killed before clearing it, the whole suite. Its
    heartbeat is 2 s (RabbitMQ's default 60 s), so that a client that stops sending them is
    dropped within a test's seconds."""

    def __init__(self) -> None:
        tools = [shutil.which(name) for name in ("rabbitmq-server", "rabbitmqctl",
                                                 "rabbitmq-diagnostics")]  # fmt: skip
        if None in tools:
            pytest.skip("rabbitmq-server is not installed")
        if os.geteuid() != 0 and _user_name() != "rabbitmq":  # Debian's wrapper refuses others
            pytest.skip("rabbitmq-server runs as root or rabbitmq only")
        server, self.ctl, self.diagnostics = (str(tool) for tool in tools)
        self.port = free_port()
        self.name = f"rollscan-test-{self.port}@localhost"
        # run as root, the server drops to its own user: a pytest folder (mode 700) is closed
        # to it, so the node's files go to a folder of their own
        self.folder = Path(tempfile.mkdtemp(prefix="rollscan-rabbitmq-"))
        try:
            self.folder.chmod(0o755)
            (self.folder / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{self.port}\nheartbeat = 2\n"
            )
            (self.folder / "enabled_plugins").write_text("[].\n")
            self.env = {**os.environ, "RABBITMQ_NODENAME": self.name,
                        "RABBITMQ_NODE_PORT": str(self.port),
                        "RABBITMQ_DIST_PORT": str(free_port()),
                        "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
                        "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
                        "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
                        "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                        "RABBITMQ_PID_FILE": str(self.folder / "pid")}  # fmt: skip
            if os.geteuid() == 0:
                shutil.chown(self.folder, "rabbitmq", "rabbitmq")
            subprocess.run([server, "-detached"], env=self.env, check=True, timeout=60)
            wait_for_port(self.port, 90, "the test's rabbitmq-server")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool, "-q", "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    def alarm(self, on: bool = True) -> None:
        """Raise (or clear) the node's memory alarm: RabbitMQ blocks every publishing connection
        while it lasts, as when its memory or disk runs low."""
        set_to = self._run(self.ctl, "set_vm_memory_high_watermark", "0.0000001" if on else "0.4")
        assert set_to.returncode == 0, set_to.stderr
        deadline = time.monotonic() + 30
        while True:
            checked = self._run(self.diagnostics, "check_alarms")
            raised = "memory alarm" in (checked.stdout + checked.stderr).lower()
            if raised == on and (on or checked.returncode == 0):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the test's RabbitMQ alarm is not {'on' if on else 'off'}: "
                            f"{checked.stdout} {checked.stderr}")  # fmt: skip
            time.sleep(0.2)

    def messages(self, queue: str) -> list[list]:
        """The task arguments of the messages waiting in `queue`, taken off it."""
        from kombu import Connection

        taken = []
        with Connection(self.url, connect_timeout=10) as conn:
            channel = conn.default_channel
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                taken.append(json.loads(message.body)[0])
        return taken

    def stop(self) -> None:
        if hasattr(self, "env"):
            try:
                self._run(self.ctl, "stop")
            except subprocess.TimeoutExpired:  # a node that does not stop is killed
                with suppress(OSError, ValueError):
                    os.kill(int((self.folder / "pid").read_text()), signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
