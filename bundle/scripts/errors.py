"""Expected errors in a line or two; their traceback in a log file.

``python -m monai.bundle run ...`` prints every exception as a traceback of 65-140 lines, with MONAI's "Failed to
instantiate component" wrappers around the bundle's own message somewhere in the middle. The configs import this
module (``imports: - $import scripts.errors``), which replaces the process's ``sys.excepthook``:

* An *expected* error, i.e. an ``OSError`` or ``ValueError`` that a ``raise`` statement in the bundle's own code
  (``scripts``) raised about its input (a missing file, an unreadable grade table, no T1 sagittal slice, settings
  that contradict the model), anywhere in the exception's chain, is printed as ``error: <its message>`` and a
  line saying where the full traceback was written (:data:`LOG_FILE`). The process still exits with status 1.
* Every other exception keeps its full traceback: it is a bug or something the bundle did not foresee.
* The debug switch, ``--debug true`` on the command line or ``SDL_GLIOMA_TRACEBACK=1`` in the environment,
  prints the full traceback of expected errors too.

Nothing changes for code that imports ``scripts`` as a library (tests, the Deploy and MONAI Label apps, a
notebook): only a process that ends on an uncaught exception reaches ``sys.excepthook``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path
from types import TracebackType

__all__ = ["LOG_FILE", "debug_requested", "expected_error", "install"]

LOG_FILE = Path(tempfile.gettempdir()) / "sdl_glioma_last_error.log"
_SCRIPTS_DIR = Path(__file__).resolve().parent


def _raised_in_scripts(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback (where it was raised) is in the bundle's code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().parent == _SCRIPTS_DIR


def expected_error(error: BaseException) -> BaseException | None:
    """The innermost error in ``error``'s chain that the bundle raised on purpose about its input, or None."""
    found, seen = None, set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OSError, ValueError)) and _raised_in_scripts(current):
            found = current
        current = current.__cause__ or current.__context__
    return found


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug true`` (or ``--debug=true``) among the command's arguments, or ``SDL_GLIOMA_TRACEBACK`` set.

    Read from the command line itself because the error may come before, or from, parsing the config.
    """
    if os.environ.get("SDL_GLIOMA_TRACEBACK", "") not in ("", "0"):
        return True
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        value = arg.partition("=")[2] if arg.startswith("--debug=") else None
        if arg == "--debug":
            value = args[i + 1] if i + 1 < len(args) else "true"
        if value is not None and value.strip().lower() in ("true", "1", "yes"):
            return True
    return False


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    expected = expected_error(error)
    if expected is None or debug_requested():
        sys.__excepthook__(kind, error, tb)
        return
    try:
        LOG_FILE.write_text("".join(traceback.format_exception(kind, error, tb)))
        where = f"full traceback in {LOG_FILE}"
    except OSError:
        where = "the traceback could not be written to a file"
    print(f"error: {expected}", file=sys.stderr)
    print(f"({where}; --debug true prints it here)", file=sys.stderr)


def install() -> None:
    """Make this process print expected errors briefly (see the module doc); idempotent."""
    sys.excepthook = _excepthook


install()
