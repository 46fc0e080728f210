"""`python -m cli ARGS` runs the `rollscan` command line (tests use it in subprocesses)."""

import sys

from cli.main import main

sys.exit(main())
