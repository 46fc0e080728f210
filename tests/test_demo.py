"""`rollscan demo` as a newcomer runs it: a fixed recipe, so the same answer on every machine —
every planted defect found, no false one — on this machine alone, even where the site's
settings name a broker (here one that is down)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_the_demo_finds_every_planted_defect_and_nothing_else(make_database, tmp_path):
    out = tmp_path / "demo.json"
    env = {**os.environ, "ROLLSCAN_DATABASE_URL": make_database(),
           "ROLLSCAN_DATA_DIR": str(tmp_path / "data"),
           "ROLLSCAN_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--workdir", str(tmp_path / "demo"),
         "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(4 epochs on" in done.stdout  # the fixed recipe, not a time budget
    result = json.loads(out.read_text())
    assert (result["planted"], result["matched"]) == (5, 5), done.stdout[-3000:]
    assert (result["found"], result["false_defects"]) == (5, 0), done.stdout[-3000:]
