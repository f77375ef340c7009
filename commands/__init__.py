"""The ``distill`` command line: the top layer, above the stages and the shared code.

:mod:`commands.main` holds the click group, the error handling and ``main()``; one module per
stage (:mod:`.prepare`, :mod:`.jitter`, :mod:`.teacher`, :mod:`.cache`, :mod:`.student`,
:mod:`.export`, :mod:`.bench`) defines that stage's commands.  Each command only parses its
arguments and calls its stage.  Nothing below this package imports it (tests/unit/test_layering.py).
"""
from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_loading(signum: int, frame: object) -> None:
    """Ctrl-C while the command line itself loads (click, the settings), before ``main`` answers it:
    nothing has started, so one line and out (exit 130)."""
    os.write(2, b"distill: interrupted; nothing was published\n")
    os._exit(130)


def _the_program() -> bool:
    """Whether this process is the ``distill`` command (``python -m commands`` or the console script),
    not a program that imports the package (the tests): only then are its signals ours to set.  Read
    from the command line as typed: while ``-m`` imports this package, ``__main__`` is not ours yet."""
    argv = getattr(sys, "orig_argv", [])
    return (any(a == "-m" and b == "commands" for a, b in zip(argv, argv[1:]))
            or any(os.path.basename(a) == "distill" for a in argv[1:2]))


if _the_program():
    signal.signal(signal.SIGINT, _interrupted_while_loading)
