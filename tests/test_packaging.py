"""rollscan as the images install it: a wheel (docker/build_env.sh), not the editable install the
tests run from. A file the installed package reads that the wheel leaves out fails only there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from rollscan_testing.services import ROOT

PACKAGES = ("distill", "storage", "worker", "scheduler", "results", "cli", "rollscan_testing",
            "migrations")  # fmt: skip


def test_the_wheel_holds_every_file_of_the_packages(tmp_path: Path) -> None:
    """Every tracked file of the packages is in the wheel: the migrations' revisions (a folder
    without `__init__.py`, packaged as a namespace) and alembic's template for a new revision
    (`migrations/script.py.mako`, left out before: `alembic revision` failed on an image)."""
    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    source = tmp_path / "source"  # built from a copy: the build writes build/ and egg-info
    for name in [*tracked, "pyproject.toml", "README.md"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("rollscan-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert "migrations/script.py.mako" in tracked
    assert set(tracked) - packaged == set()
    assert "cli/main.py" in packaged and "migrations/versions/0001_initial.py" in packaged
