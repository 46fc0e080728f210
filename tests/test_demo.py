"""`rollscan demo` as a newcomer runs it: a fixed recipe, so the same answer on every machine —
every planted defect found, no false one — on this machine alone, even where the site's
settings name a broker (here one that is down)."""

import json
import os
import signal
import subprocess
import sys
import time


def test_the_demo_finds_every_planted_defect_and_nothing_else(make_database, tmp_path):
    out = tmp_path / "demo.json"
    # run where a user is, not in the checkout: its own files go under ROLLSCAN_DATA_DIR (they
    # went to ./runs/demo, which an installed rollscan's current directory may not take)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "ROLLSCAN_DATABASE_URL": make_database(),
           "ROLLSCAN_DATA_DIR": str(tmp_path / "data"),
           "ROLLSCAN_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800, check=False, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(4 epochs on" in done.stdout  # the fixed recipe, not a time budget
    result = json.loads(out.read_text())
    assert (result["planted"], result["matched"]) == (5, 5), done.stdout[-3000:]
    assert (result["found"], result["false_defects"]) == (5, 0), done.stdout[-3000:]
    # what to do next, as it can be done: the commands, the embedded server reached by psql
    assert "see them:   rollscan defects demo-" in done.stdout
    assert 'query them: rollscan db psql -c "SELECT * FROM current_defects' in (done.stdout)
    assert (tmp_path / "data" / "demo" / "model.pt").is_file()
    assert list(cwd.iterdir()) == []

    # interrupted while its roll is scored (the model reused): the roll left is named, and how
    # to finish it
    demo = subprocess.Popen(
        [sys.executable, "-m", "cli", "demo", "--workdir", str(tmp_path / "data" / "demo")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
    )  # fmt: skip
    for line in demo.stdout:
        if line.startswith("submitting demo-"):
            roll_id = line.split()[1].rstrip(":")
            break
    time.sleep(3)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=300)
    assert demo.returncode == 130, err[-3000:]
    assert f"roll {roll_id} left unfinished: `rollscan resume {roll_id}` finishes it" in err
