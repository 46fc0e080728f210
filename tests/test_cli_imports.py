"""The command line starts light: `rollscan --help` and `rollscan db url` import neither torch
nor timm (heavy imports live inside the commands that need them), and every subcommand
dispatches through the one `handler` its parser sets (one module per command or group)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli.main import COMMAND_MODULES, build_parser

# runs the command line as `python -m cli` would, then reports which heavy modules it loaded
_PROBE = """
import runpy, sys
sys.argv = ["rollscan", *sys.argv[1:]]
try:
    runpy.run_module("cli", run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
loaded = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["db", "url"], ["train", "--help"]])
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLSCAN_")}
    # a configured URL: `db url` prints it masked and starts no embedded server
    env["ROLLSCAN_DATABASE_URL"] = "postgresql://scanner:s3cret@127.0.0.1:1/rollscan"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stderr.rsplit("LOADED=", 1)[1].strip()
    if argv == ["train", "--help"]:
        # the teacher and variant choices are listed: looked up only for this help page
        assert "efficientnet_lite0" in done.stdout and "residual" in done.stdout
    else:
        assert loaded == "", f"`rollscan {' '.join(argv)}` imported {loaded}"
    if argv == ["db", "url"]:
        assert "scanner:***@127.0.0.1:1" in done.stdout and "s3cret" not in done.stdout


def test_every_subcommand_sets_one_handler() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the `rollscan` subcommands
    assert len(commands) == len(COMMAND_MODULES)  # one module per command (group)
    for name, sub in commands.items():
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        leaves = nested[0].choices.values() if nested else [sub]
        for leaf in leaves:
            assert callable(leaf.get_default("handler")), f"rollscan {name}: no handler"


def test_an_unknown_teacher_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--teacher", "nope"])
    assert exit.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
