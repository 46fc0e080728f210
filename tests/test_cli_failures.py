"""What an operator sees when the system around a command is not there: a service down is named in
one line with exit code 3 (try again once it is back), a database at another schema revision is
refused before the command runs, and `rollscan defects` never shows a failed or unscored roll as
a flawless one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures_pg import alter_database
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.orm import Session

from cli.main import main
from storage.database import head_revision, upgrade
from storage.schema import Roll
from worker.roll_rows import fail_roll

DOWN = "127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("ROLLSCAN_CONFIG", "ROLLSCAN_BROKER_URL", "ROLLSCAN_S3_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROLLSCAN_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def _roll_folder(tmp_path: Path, frames: int = 1) -> Path:
    folder = tmp_path / "R-1"
    (folder / "frames").mkdir(parents=True)
    manifest = {"roll_id": "R-1", "fabric_type": "twill", "width_mm": 30.0, "px_per_mm": 10.0,
                "complete": True, "frames": frames}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for seq in range(1, frames + 1):
        tifffile.imwrite(folder / "frames" / f"{seq:06d}.tif", np.full((300, 300), 90, np.uint8))
    return folder


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_database_that_is_down_is_named_in_one_line(site, capsys) -> None:
    site.setenv("ROLLSCAN_DATABASE_URL", f"postgresql://scanner:s3cret@{DOWN}/rollscan")
    assert main(["rolls"]) == 3
    line = _one_line_error(capsys)
    assert line.startswith("rollscan rolls: error: cannot reach the database:"), line
    assert "s3cret" not in line


def test_a_database_that_does_not_exist_is_a_setting_to_correct(site, capsys, migrated_url):
    missing = make_url(migrated_url).set(database="no_such_database").render_as_string(False)
    site.setenv("ROLLSCAN_DATABASE_URL", missing)
    assert main(["rolls"]) == 2  # not 3: waiting will not bring it
    line = _one_line_error(capsys)
    assert line.startswith("rollscan rolls: error: cannot connect to the database:"), line
    assert "no_such_database" in line


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "ROLLSCAN_DATABASE_URL",
            "s3cret-notaurl",
            "database_url (ROLLSCAN_DATABASE_URL): Value error, not a PostgreSQL URL",
        ),
        ("ROLLSCAN_DATABASE_URL", "127.0.0.1:5432/db", "not a PostgreSQL URL"),
        # the password's tail was read as the host, and shown by `db url` and in errors
        ("ROLLSCAN_DATABASE_URL", "postgresql://u:pw@s3cret@127.0.0.1/db", "written %40"),
        (
            "ROLLSCAN_BROKER_URL",
            "localhost:6379",
            "broker_url (ROLLSCAN_BROKER_URL): Value error, not a broker URL",
        ),
        ("ROLLSCAN_BROKER_URL", "http://s3cret@broker/", "not a broker URL"),
        # a '/' or '#' ended the URL for kombu, whose port error quoted the password's first part
        ("ROLLSCAN_BROKER_URL", "amqp://u:s3cret/pw@127.0.0.1:5672/vh", "%2F, %23, %3F, %40"),
        ("ROLLSCAN_BROKER_URL", "redis://:s3cret#pw@127.0.0.1:6379/0", "must be percent-encoded"),
        # an '@' then ':' in the password: int() of the port quoted its tail
        (
            "ROLLSCAN_DATABASE_URL",
            "postgresql://u:ab@s3cret:pw@127.0.0.1:5432/db",
            "not a PostgreSQL",
        ),
        ("ROLLSCAN_CONFIG", "band_height = \n", "is not valid TOML: Invalid value (at line 1"),
        # each started a healthy worker that failed every roll at its first band or frame
        ("ROLLSCAN_DEVICE", "gpu", "device (ROLLSCAN_DEVICE): Value error, not a device: 'gpu'"),
        (
            "ROLLSCAN_S3_ENDPOINT",
            "minio:9000",
            "(ROLLSCAN_S3_ENDPOINT): Value error, not an endpoint URL",
        ),
        ("ROLLSCAN_OVERLAP", "200", "overlap 200 must be at most half the tile (128)"),
        (
            "ROLLSCAN_S3_BUCKET",
            "rollscan ",
            "s3_bucket (ROLLSCAN_S3_BUCKET): Value error, not a bucket name: 'rollscan '",
        ),
    ],
)
def test_a_malformed_service_setting_is_one_line_naming_it(
    site, capsys, tmp_path, name, value, says
) -> None:
    """A malformed database URL was a 29-line traceback (exit 1), a broker "localhost:6379" a
    broker that is down (exit 3), a broken TOML file named neither file nor setting."""
    if name == "ROLLSCAN_CONFIG":
        (tmp_path / "site.toml").write_text(value)
        value = str(tmp_path / "site.toml")
    site.setenv(name, value)
    assert main(["rolls"]) == 2
    line = _one_line_error(capsys)
    assert says in line and "s3cret" not in line, line


def test_failover_brokers_are_a_broker_url() -> None:
    """kombu's ';'-separated failover URL: its port check refused it once."""
    from storage.settings import Settings

    url = "amqp://guest:guest@h1:5672;amqp://guest:guest@h2:5672//"
    assert Settings(broker_url=url).broker_url.get_secret_value() == url


def test_a_misspelt_setting_is_warned_about_with_the_one_meant(migrated_url, tmp_path) -> None:
    """ROLLSCAN_TIMEZONE_ (or ROLLSCAN_S3_BUCKETS) was ignored without a word: the site graded
    at 02:00 UTC, its bucket the default one."""
    env = {"ROLLSCAN_DATABASE_URL": migrated_url, "ROLLSCAN_DATA_DIR": str(tmp_path),
           "ROLLSCAN_TIMEZONE_": "Europe/Paris", "ROLLSCAN_READER_PASSWORD": "pw"}  # fmt: skip
    done = _rollscan(env, "rolls")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("ROLLSCAN_TIMEZONE_ is no rollscan setting: ignored (did you mean "
            "ROLLSCAN_TIMEZONE?)") in done.stderr  # fmt: skip
    assert "ROLLSCAN_READER_PASSWORD" not in done.stderr  # read where it is used


def test_an_s3_endpoint_without_credentials_is_a_setting_to_correct() -> None:
    from botocore.exceptions import NoCredentialsError

    from cli.connect import service_error

    assert service_error(NoCredentialsError()) == (
        "the object store refused: Unable to locate credentials", 2,
    )  # fmt: skip


def test_a_database_that_never_answers_is_given_up(migrated_url, tmp_path) -> None:
    """A server that accepts and never answers held `rollscan rolls` for ever (and Ctrl-C with
    it): libpq's connect timeout ends it as an outage."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        port = silent.getsockname()[1]
        url = make_url(migrated_url).set(host="127.0.0.1", port=port).render_as_string(False)
        env = {"ROLLSCAN_DATABASE_URL": url, "ROLLSCAN_DATA_DIR": str(tmp_path)}
        done = _rollscan(env, "rolls")
        assert done.returncode == 3, done.stderr[-3000:]
        assert "cannot reach the database: connection to server" in done.stderr
        # the migrations' own connection too: the site's `migrate` waited there, silent
        done = _rollscan(env, "db", "upgrade")
    assert done.returncode in (2, 3), done.stderr[-3000:]
    assert "db upgrade: cannot reach" in done.stderr and "timeout expired" in done.stderr


def test_a_database_at_another_revision_is_refused_before_the_command_runs(
    site, capsys, make_database
) -> None:
    url = make_database()
    site.setenv("ROLLSCAN_DATABASE_URL", url)
    assert main(["defects", "R-1"]) == 2  # empty: no table at all
    assert "revision none (empty)" in _one_line_error(capsys)
    upgrade(url, "0006")
    assert main(["rolls"]) == 2
    line = _one_line_error(capsys)
    assert "revision 0006" in line and "run `rollscan db upgrade`" in line, line
    assert main(["reprocess", "--model", "m", "--dry-run"]) == 2  # a dry run checks too
    assert "revision 0006" in _one_line_error(capsys)
    engine = create_engine(url)  # migrated by a newer rollscan
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    assert main(["rolls"]) == 2
    line = _one_line_error(capsys)
    assert "0099, newer than this rollscan's" in line
    # going back to this release: the older rollscan cannot step down from a revision it lacks
    assert (
        f"downgrade the database with the newer one first (`rollscan db downgrade {head_revision()} --yes`"
        in line
    )


def _rollscan(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    """The command line in a process of its own: its Celery app and object store are built from
    the settings once per process, as an operator's are."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROLLSCAN_", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "cli", *argv], env={**base, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    ("service", "settings"),
    [
        ("the broker", {"ROLLSCAN_BROKER_URL": f"amqp://guest:guest@{DOWN}//"}),
        ("the object store", {"ROLLSCAN_S3_ENDPOINT": f"http://{DOWN}",
                              "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}),
    ],
)  # fmt: skip
def test_a_broker_or_object_store_that_is_down_is_named_in_one_line(
    service, settings, migrated_url, db_engine, tmp_path
) -> None:
    env = {"ROLLSCAN_DATABASE_URL": migrated_url, "ROLLSCAN_DATA_DIR": str(tmp_path / "data")}
    done = _rollscan({**env, **settings}, "submit", str(_roll_folder(tmp_path)))
    errors = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert done.returncode == 3, done.stderr[-3000:]
    assert errors == [errors[0]] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors[0].startswith(f"rollscan submit: error: cannot reach {service}:"), errors


def test_a_broker_or_object_store_refusing_the_sites_settings_is_named(
    migrated_url, db_engine, s3_server, tmp_path
) -> None:
    env = {"ROLLSCAN_DATABASE_URL": migrated_url, "ROLLSCAN_DATA_DIR": str(tmp_path / "data")}
    folder = str(_roll_folder(tmp_path))
    done = _rollscan({**env, "ROLLSCAN_BROKER_URL": "amqp://guest:wrong@127.0.0.1:5672//"},
                     "submit", folder)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "rollscan submit: error: the broker refused the connection:" in done.stderr
    no_bucket = {"ROLLSCAN_S3_ENDPOINT": s3_server, "ROLLSCAN_S3_BUCKET": "no-such-bucket",
                 "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}  # fmt: skip
    done = _rollscan({**env, **no_bucket}, "submit", folder)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "rollscan submit: error: the object store refused:" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_broker_blocking_publishers_is_named_and_no_frame_is_lost(
    own_rabbitmq, migrated_url, db_engine, tmp_path
) -> None:
    """While RabbitMQ's resource alarm blocked publishers, `rollscan submit` left its messages in
    the socket's buffer, said "2000 frames submitted" and exited: 24 arrived, and the roll's
    cursor said that every frame had gone, so discovery sent none of the others again."""
    frames = 12
    env = {"ROLLSCAN_DATABASE_URL": migrated_url, "ROLLSCAN_DATA_DIR": str(tmp_path / "data"),
           "ROLLSCAN_BROKER_URL": own_rabbitmq.url}  # fmt: skip
    own_rabbitmq.alarm()
    done = _rollscan(env, "submit", str(_roll_folder(tmp_path, frames)))
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert "rollscan submit: error: the broker takes no work: it blocks publishing" in done.stderr
    assert "Traceback" not in done.stderr and "submitted" not in done.stdout, done.stdout
    own_rabbitmq.alarm(on=False)
    done = _rollscan(env, "scheduler", "--once")  # discovery sends what was not sent
    assert done.returncode == 0, done.stderr[-3000:]
    time.sleep(1)  # the message the alarm held may still be on its way
    # …and arrives once the alarm clears (not tried again while it lasted: one copy at most)
    sent = Counter(tuple(args[:2]) for args in own_rabbitmq.messages("ingest"))
    held = sent.pop(("R-1", 1), 0)
    assert sent == {("R-1", seq): 1 for seq in range(2, frames + 1)} and held in (1, 2), sent


def test_the_zarr_paths_refusals_are_the_object_stores_a_local_files_is_not() -> None:
    """obstore's PermissionDeniedError (wrong credentials on the zarr path) printed a 60-line
    traceback; s3fs's PermissionError too."""
    import obstore.exceptions
    from botocore.exceptions import ClientError

    from cli.connect import service_error

    denied = obstore.exceptions.PermissionDeniedError("The request signature does not match")
    try:
        try:
            raise denied
        except obstore.exceptions.PermissionDeniedError as inner:
            raise RuntimeError("zarr could not read the shard") from inner
    except RuntimeError as outer:
        assert service_error(outer) == (
            "the object store refused: The request signature does not match", 2,
        )  # fmt: skip
    # s3fs's PermissionError, caused by botocore's refusal of a HEAD (no body: code "403")
    response = {"Error": {"Code": "403", "Message": "Forbidden"}, "ResponseMetadata": {}}
    s3fs_error = PermissionError("Forbidden")
    s3fs_error.__cause__ = ClientError(response, "HeadObject")  # type: ignore[arg-type]
    assert service_error(s3fs_error) == (
        "the object store refused: An error occurred (403) when calling the HeadObject "
        "operation: Forbidden", 2,
    )  # fmt: skip
    # a PermissionError of our own (an unwritable --out) is not the store's
    assert service_error(PermissionError("cannot write a checkpoint into /ro")) is None


def test_defects_of_a_roll_not_scored_or_failed_are_not_no_defects(
    site, capsys, migrated_url, db_session: Session
) -> None:
    site.setenv("ROLLSCAN_DATABASE_URL", migrated_url)
    db_session.add(Roll(id="R-1", fabric_type="twill", width_mm=30.0, px_per_mm_x=10.0,
                        px_per_mm_y=10.0, status="scoring"))  # fmt: skip
    db_session.commit()
    for argv in (["defects", "R-1"], ["defects", "R-1", "--csv"]):
        assert main(argv) == 1
        out = capsys.readouterr()
        assert out.out == "" and "roll R-1 is not scored yet (status scoring)" in out.err
    fail_roll(db_session, "R-1", "frame 3: not a TIFF")
    db_session.commit()
    assert main(["defects", "R-1"]) == 1
    assert "failed, before any run finished: frame 3: not a TIFF" in capsys.readouterr().err
    assert main(["defects", "R-2"]) == 2
    assert "unknown roll 'R-2'" in _one_line_error(capsys)


def test_the_demo_finds_an_object_store_down_before_it_trains(migrated_url, tmp_path) -> None:
    env = {"ROLLSCAN_DATABASE_URL": migrated_url, "ROLLSCAN_DATA_DIR": str(tmp_path / "data"),
           "ROLLSCAN_S3_ENDPOINT": f"http://{DOWN}", "AWS_ACCESS_KEY_ID": "key",
           "AWS_SECRET_ACCESS_KEY": "secret"}  # fmt: skip
    done = _rollscan(env, "demo", "--workdir", str(tmp_path / "demo"))
    assert done.returncode == 3, done.stderr[-3000:]
    assert "rollscan demo: error: cannot reach the object store:" in done.stderr
    assert "training" not in done.stdout and not (tmp_path / "demo" / "train-data").exists()


def test_a_read_only_database_is_named_with_what_to_do(
    site, capsys, make_database, db_engine, env_context, tmp_path
) -> None:
    """A command on a standby (after a failover, a URL naming the wrong host) had said "cannot
    reach the database: cannot execute INSERT in a read-only transaction"."""
    url = make_database()
    upgrade(url)
    alter_database(db_engine, url, "SET default_transaction_read_only = on")
    env_context(url, tmp_path / "data")  # the process's context on it, forgotten afterwards
    assert main(["submit", str(_roll_folder(tmp_path))]) == 3
    line = _one_line_error(capsys)
    assert line.startswith(
        "rollscan submit: error: the database is read-only (a standby?): cannot execute"
    ), line
    assert line.endswith("connect to the primary (several hosts: target_session_attrs=read-write)")
