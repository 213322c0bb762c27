"""User errors: one clear line saying what is wrong and what to do, never a traceback."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

# Under torchrun every process meets the same user error. A machine's first process prints it at once;
# the others wait first, and the launcher stops them when the first one has exited (which takes seconds:
# its process group shuts down). So one line shows; a process prints its own only when the error was its alone.
OTHER_PROCESSES_WAIT_S = 10.0


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file). Entry points print it as one line."""


def writable_folder(path: str | os.PathLike, flag: str, create: bool = True) -> None:
    """Make the output folder `path` (given by `flag`), or stop in one line before any work is done.
    create=False only checks that it could be made (nothing is left behind by a run that stops later)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file: pass a new or empty folder")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot write to {flag} {path}: {err.strerror}") from None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write to {flag} {path}: {existing} is not a writable folder")


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        _print_error(f"error: {err}")
        sys.exit(2)
    except ModuleNotFoundError as err:
        package = (err.name or "").split(".")[0]
        if not package or package == "sdtune":  # our own import: a bug, not the install
            raise
        _print_error(f"error: the Python package {package!r} is missing: install the toolkit's requirements (make "
                     "setup, or pip install -r requirements.txt) in the Python that runs this")
        sys.exit(2)


def _print_error(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(OTHER_PROCESSES_WAIT_S)
    print(line, file=sys.stderr, flush=True)
