"""The ``distill`` command line: the top layer, above the stages and the shared code.

:mod:`commands.main` holds the click group, the error handling and ``main()``; one module per
stage (:mod:`.prepare`, :mod:`.jitter`, :mod:`.teacher`, :mod:`.cache`, :mod:`.student`,
:mod:`.export`, :mod:`.bench`) defines that stage's commands.  Each command only parses its
arguments and calls its stage.  Nothing below this package imports it (tests/unit/test_layering.py).
"""
