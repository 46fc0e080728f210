"""`rollscan models register | list | activate | unregister`: the model registry from the command
line."""

from __future__ import annotations

import argparse
from typing import Any

from cli.connect import command_session
from storage.settings import get_settings


def _register(args: argparse.Namespace) -> int:
    from storage.objectstore import open_object_store
    from storage.registry import activate_model, register_model

    settings = get_settings()
    store = open_object_store(settings)
    with command_session(settings) as session:
        model, created = register_model(
            session, store, args.checkpoint, fabric_type=args.fabric, version=args.version,
            teacher_weights=args.teacher_weights,
        )  # fmt: skip
        what = "registered" if created else "already registered"
        print(
            f"{what}: {model.version} (fabric {model.fabric_type or 'generic'}, sha256 {model.sha256[:12]}…)"
        )
        if args.activate:
            activate_model(session, model.version, store)
            print(f"activated {model.version}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from storage.registry import list_models

    with command_session() as session:
        models = list_models(session, args.fabric)
        print(
            f"{'version':<32}{'fabric':<14}{'variant':<10}{'teacher':<20}{'threshold':>10}  active"
        )
        for m in models:
            print(
                f"{m.version:<32}{m.fabric_type or '(generic)':<14}{m.variant:<10}{m.teacher:<20}"
                f"{m.threshold:>10.4f}  {'yes' if m.active else ''}"
            )
        if not models:
            print("no models registered")
    return 0


def _activate(args: argparse.Namespace) -> int:
    from storage.objectstore import open_object_store
    from storage.registry import activate_model

    settings = get_settings()
    with command_session(settings) as session:
        model = activate_model(session, args.version, open_object_store(settings))
        print(f"activated {model.version} for fabric {model.fabric_type or 'generic'}")
    return 0


def _unregister(args: argparse.Namespace) -> int:
    from storage.registry import unregister_model

    with command_session() as session:
        model = unregister_model(session, args.version)
        print(f"unregistered {model.version} (fabric {model.fabric_type or 'generic'})")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `models register | list | activate | unregister` to the main parser's subparsers."""
    parser = subparsers.add_parser("models", help="register, list, activate and unregister models")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    register = sub.add_parser("register", help="upload a checkpoint and record it")
    register.add_argument("checkpoint")
    slot = register.add_mutually_exclusive_group(required=True)
    slot.add_argument("--fabric", help="the fabric type this model inspects")
    slot.add_argument(
        "--generic", action="store_true", help="the generic DG model for fabric types without one"
    )
    register.add_argument("--version", default=None, help="default: <fabric>-<sha256 prefix>")
    register.add_argument(
        "--teacher-weights", default=None, metavar="PATH",
        help="the local weight file a model was trained on (`train --teacher-weights PATH`): "
        "its teacher is stored with the model, for the workers",
    )  # fmt: skip
    register.add_argument("--activate", action="store_true", help="activate it at once")
    register.set_defaults(handler=_register)
    listing = sub.add_parser("list", help="registered models")
    listing.add_argument("--fabric", default=None)
    listing.set_defaults(handler=_list)
    activate = sub.add_parser("activate", help="make a version its fabric type's active model")
    activate.add_argument("version")
    activate.set_defaults(handler=_activate)
    unregister = sub.add_parser(
        "unregister", help="remove a model that never inspected a roll and is not active"
    )
    unregister.add_argument("version")
    unregister.set_defaults(handler=_unregister)
    return parser
