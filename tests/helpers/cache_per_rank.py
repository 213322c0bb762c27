"""Launched by tests/test_distributed.py: evaluate.py with a feature cache folder of each process's own,
as on machines that each keep a local cache. argv: CACHE_ROOT, then evaluate.py's arguments."""

import os
import sys

os.environ["XDG_CACHE_HOME"] = os.path.join(sys.argv.pop(1), f"rank{os.environ.get('RANK', '0')}")

from sdtune.errors import run_cli  # noqa: E402
from sdtune.evaluation.cli import main  # noqa: E402

run_cli(main)
