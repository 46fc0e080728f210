"""The `rollscan` command line: the parser of every command, and the one dispatch rule.

Every subcommand's parser sets one `handler` (`set_defaults(handler=…)`); `main` calls it.
A command is a module of this package with an `add_parser(subparsers)` function; to add one,
write the module and list it in `COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from cli import (
    datasets_commands,
    db_commands,
    defects_command,
    demo_command,
    evaluate_command,
    grade_command,
    models_commands,
    report_command,
    reprocess_command,
    resume_command,
    rolls_command,
    scheduler_command,
    submit_command,
    train_command,
)
from cli.connect import service_error
from distill.malloc_tuning import keep_freed_memory
from storage.objectstore import ObjectNotFound

# in the order `rollscan --help` lists them
COMMAND_MODULES: tuple[ModuleType, ...] = (
    train_command,
    evaluate_command,
    datasets_commands,
    demo_command,
    submit_command,
    db_commands,
    models_commands,
    grade_command,
    scheduler_command,
    resume_command,
    reprocess_command,
    rolls_command,
    defects_command,
    report_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand's namespace carries its `handler`."""
    parser = argparse.ArgumentParser(prog="rollscan", description="The `rollscan` command line.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; after `db psql` they are psql's, passed on unparsed (`-c` was refused)."""
    at = next((i for i in range(len(argv)) if argv[i : i + 2] == ["db", "psql"]), None)
    if at is None or not all(arg.startswith("-") for arg in argv[:at]):
        return build_parser().parse_args(argv)
    args = build_parser().parse_args([*argv[:at], "db", "psql"])
    args.psql_args = argv[at + 2 :]
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the process's arguments), run the command, return its exit code.

    A service that is down or unreachable (the database, the broker, the object store) is
    named in one line (exit code 3: try again once it is back), one that refuses the site's
    settings too (exit code 2); a ValueError, OSError, RuntimeError or a missing object is
    printed as one line (exit code 2); Ctrl-C exits 130. With -v each propagates with its
    traceback."""
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"\nrollscan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        service = service_error(exc)
        plain = isinstance(exc, ValueError | OSError | RuntimeError | ObjectNotFound)
        if args.verbose or not (service or plain):
            raise
        # KeyError's str() is the repr of its argument: the message itself
        message, code = service or (exc.args[0] if isinstance(exc, ObjectNotFound) else exc, 2)
        print(f"rollscan {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
