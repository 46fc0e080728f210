"""The commands the deployment runs, parsed by their real entry points: `rollscan …` by
`cli.main.build_parser()`, `celery -A worker.app …` by Celery's own command line with the real
app; a worker's queues must be ones the app routes tasks to.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.app.utils import find_app
from celery.bin.base import CLIContext
from celery.bin.celery import celery

import worker.app
from cli.main import build_parser

# Celery subcommands that come from a package the images install (checked by
# test_dockerfile.py's test_images_install_the_plugin_commands) but that the test environment
# may lack
PLUGIN_COMMANDS = {"flower": "flower"}


def parse_rollscan(args: list[str]) -> Any:
    """`rollscan ARGS` parsed by the real command line; a subcommand main() dispatches."""
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`rollscan {' '.join(args)}` is not a valid rollscan command line")
    assert callable(getattr(parsed, "handler", None)), (
        f"rollscan {parsed.command}: parsed but not dispatched"
    )
    return parsed


def parse_celery(args: list[str]) -> tuple[Any, str, dict[str, Any] | None]:
    """`celery ARGS` parsed by Celery's own command line with the real app: (app, subcommand,
    the subcommand's parsed options, or None for a plugin command not installed here)."""
    context = celery.make_context("celery", list(args))
    assert context.params.get("app"), f"`celery {' '.join(args)}` names no app (-A)"
    app = find_app(context.params["app"])
    context.obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    known = set(celery.list_commands(context))
    position = next(
        (
            i
            for i, word in enumerate(args)
            if not word.startswith("-") and (i == 0 or args[i - 1] not in ("-A", "--app"))
        ),
        None,
    )
    assert position is not None, f"`celery {' '.join(args)}`: no subcommand"
    name = args[position]
    if name not in known:
        assert name in PLUGIN_COMMANDS, f"`celery {name}` is not a Celery command"
        return app, name, None
    command = celery.get_command(context, name)
    sub = command.make_context(name, list(args[position + 1 :]), parent=context)
    return app, name, sub.params


def declared_queues() -> set[str]:
    routed = {route["queue"] for route in worker.app.app.conf.task_routes.values()}
    return set(worker.app.QUEUES) | routed


def node_option(words: list[str]) -> str | None:
    for flag in ("-n", "--hostname"):
        if flag in words:
            return words[words.index(flag) + 1]
    match = next((w for w in words if w.startswith("--hostname=")), None)
    return match.split("=", 1)[1] if match else None


def check_command(words: list[str], where: str) -> tuple[str, Any]:
    """Parse a command our image runs; return (entry point, what the parser made of it)."""
    assert words, f"{where}: empty command"
    if words[0] == "rollscan":
        return "rollscan", parse_rollscan(words[1:])
    if words[0] == "celery":
        app, name, params = parse_celery(words[1:])
        assert app is worker.app.app, f"{where}: -A does not name worker.app's Celery app"
        if name == "worker":
            assert params is not None
            queues = set(params["queues"] or [])
            assert queues, f"{where}: a worker without -Q consumes only the default queue"
            unknown = queues - declared_queues()
            assert not unknown, (
                f"{where}: queues {sorted(unknown)} are not in worker.app.QUEUES or its routes "
                f"({sorted(declared_queues())})"
            )
        return f"celery {name}", params
    raise AssertionError(f"{where}: `{words[0]}` is neither `rollscan` nor `celery`")
