"""The `rollscan` command line: one module per command (or command group), named after it.

`cli.main` builds the parser from each module's `add_parser` and calls the one `handler` the
chosen subcommand set. Modules import only argparse-level things at the top; torch, timm, Celery
and the pipeline are imported inside the commands that need them, so `rollscan --help` and
`rollscan db url` stay fast.
"""
