"""User errors: one clear line saying what is wrong and what to do, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file). Entry points print it as one line."""


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as err:
        package = (err.name or "").split(".")[0]
        if not package or package == "sdtune":  # our own import: a bug, not the install
            raise
        print(f"error: the Python package {package!r} is missing: install the toolkit's requirements (make setup, or "
              "pip install -r requirements.txt) in the Python that runs this", file=sys.stderr)
        sys.exit(2)
