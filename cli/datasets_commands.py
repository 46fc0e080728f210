"""`rollscan datasets import-aitex`: convert data sets (AITEX strips → MVTec layout)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.arg_types import options


def _import_aitex(args: argparse.Namespace) -> int:
    from distill.data.aitex import import_aitex

    counts = import_aitex(
        args.src, args.dst, **options(args, "tile overwrite", n_train_strips="train_strips",
                                      fabrics="fabric", defect_strip_good="defect_strip_good_tiles",
                                      edge_tiles="edge_tiles", edge_start_tiles="edge_start_tiles")
    )  # fmt: skip
    print(json.dumps(counts, indent=2))
    if not any(c["train_good"] + c["test_good"] + c["test_defect"] for c in counts.values()):
        print(f"rollscan datasets import-aitex: no tile imported from {args.src} (every strip "
              "skipped: see the lines above)", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `datasets import-aitex` to the main parser's subparsers."""
    p = subparsers.add_parser("datasets", help="convert data sets")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    a = dsub.add_parser("import-aitex", help="AITEX strips → MVTec layout per fabric")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    a.add_argument("--tile", type=int, default=256)
    a.add_argument("--train-strips", type=int, default=15, help="first N good strips of a roll")
    a.add_argument("--fabric", action="append", default=None, help="fabric code (repeatable)")
    a.add_argument("--overwrite", action="store_true", help="replace existing fabric folders")
    a.add_argument(
        "--defect-strip-good-tiles",
        action="store_true",
        help="also test the defect strips' unmasked tiles as good (off by default)",
    )
    a.add_argument(
        "--no-edge-tiles", dest="edge_tiles", action="store_false",
        help="no extra training tiles across the fabric's edge half a tile off the grid",
    )  # fmt: skip
    a.add_argument(
        "--edge-start-tiles", action="store_true",
        help="also the training tiles that start at the fabric's edges, for models trained with "
        "--tile-layout fabric (off by default)",
    )  # fmt: skip
    a.set_defaults(handler=_import_aitex)
    return p
