"""The ``distill`` command: one subcommand per stage; each only parses and calls its stage.

Every path is given by the caller (the Makefile names them); settings come from the stage's frozen
dataclass (``--help`` lists them), optionally from ``--config FILE.json``.  Errors end the command
with one line on stderr and the exit code of :mod:`pipeline.errors`; a resource fault that no stage
turned into a ResourceError (a full disk under a temporary folder, an allocation that failed deep in
numpy, torch or onnxruntime) is turned into one here (exit 7), naming for memory the setting that
lowers the command's footprint (``FOOTPRINT`` of its settings class).

The commands themselves live in one module per stage (:mod:`commands.prepare` ... :mod:`commands.bench`),
named in :data:`COMMANDS` and imported only when the command line needs them: ``distill student ...``
loads :mod:`commands.student` alone.  This module imports none of them, so make's code prerequisites
(scripts/code_deps.py) tie each stage's artifacts to this module and that stage's command module only.

Lazy: the command modules import only the stages' settings modules (no torch, no onnxruntime); a
command imports its stage's code when it runs, inside :func:`importing`, so ``distill --help`` and
``distill <stage> --help`` are fast (``tests/unit/test_cli_lazy.py`` checks ``sys.modules``) and a
memory ceiling hit while torch or onnxruntime loads is one line (exit 7).

One line, whatever happens: click's own usage errors (exit 2), and Ctrl-C at any moment (exit 130:
the first SIGINT sets a flag and raises KeyboardInterrupt, held while a stage's libraries load
(:func:`importing`), later ones are ignored while the command cleans up, and any error raised on the
way out of an interrupted command is reported as the interrupt).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

import commands
from pipeline import artifacts, config, resources
from pipeline.errors import Interrupted, PipelineError, ResourceError, UsageError

PathArg = click.Path(path_type=Path)


def say(message: str) -> None:
    """A log line of a command: on stderr, so that stdout carries only what a command prints as its result."""
    click.echo(message, err=True)


def stage_command(name: str, settings: type, group: click.Group | None = None,
                  renamed: dict[str, str] | None = None, **kw: Any) -> Callable:
    """``fn(cfg, **paths)`` as command ``name`` with the options of ``settings``: a subcommand of
    ``group`` if given, else a top-level command (listed in :data:`COMMANDS`).

    ``renamed`` maps settings' former names to their names now (``{"shift": "max_shift"}``): the former
    option (hidden from ``--help``) and the former key in ``--config`` files still work, for one release,
    with a line on stderr that says so."""
    renamed = renamed or {}

    # the command as the user typed it: `cache merge`, not `merge` (defaults of a group stay implicit)
    where = (name if group is None else group.name if getattr(group, "default", None) == name
             else f"{group.name} {name}")

    def decorate(fn: Callable) -> click.Command:
        @functools.wraps(fn)
        def run(config_file: Path | None, **kwargs: Any) -> None:
            # A write past `ulimit -f` raises SIGXFSZ, whose default action kills the process (and
            # dumps core) before the write can fail.  CPython already ignores it at start-up; say so
            # here too, for embedders and forks that restore default signals, so that such a write
            # fails with EFBIG and is reported like a full disk (exit 7).
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            former = {old: kwargs.pop(config.former_option(old)) for old in renamed}
            overrides, paths = config.split_settings(settings, kwargs)
            cfg = None
            try:
                _take_former(where, former, renamed, overrides)
                cfg = config.load(settings, config_file, overrides, renamed,
                                  warn=lambda line: say(f"distill {where}: {line}"))
                fn(cfg, **paths)
                _quiet()  # done: a Ctrl-C from here on would only tear up the exit of a command that succeeded
            except PipelineError as e:
                _fail(where, e)
            except KeyboardInterrupt:
                _interrupted_exit(where)
            except Exception as e:  # a resource fault becomes exit 7, anything else stays a bug
                err = resources.as_resource_error(e, IMPORT_HINT if _while_importing(e) else _footprint(settings, cfg))
                if err is None and not _interrupted:
                    raise
                _fail(where, err or e)

        cmd = config.options(settings, renamed)(run)
        return (group.command if group is not None else click.command)(name, help=settings.__doc__, **kw)(cmd)

    return decorate


def _take_former(where: str, former: dict[str, Any], renamed: dict[str, str], overrides: dict[str, Any]) -> None:
    """The values given under former option names, moved to their settings' names now (said on stderr)."""
    for old, value in former.items():
        if value is None:
            continue
        new = renamed[old]
        flag, now = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
        if overrides.get(new) is not None:
            raise UsageError(f"{flag} and {now} are the same setting; give {now} only")
        say(f"distill {where}: {flag} is now {now}; the old name is accepted for one more release")
        overrides[new] = value


def _fail(where: str, e: BaseException) -> None:
    if _interrupted and not isinstance(e, Interrupted):  # an error on the way out of an interrupted command
        _interrupted_exit(where)  # (inside h5py's lock, a worker) is the interrupt; a stage's own words stay
    _quiet()
    kind = "" if isinstance(e, Interrupted) else "error: "  # an interrupt a stage words is not an error
    say(f"{_name(where)}: {kind}{' '.join(str(e).split())}")  # always one line
    sys.exit(getattr(e, "exit_code", 1))


def _name(where: str) -> str:
    """``distill cache merge``: the command as typed (``distill`` alone before one is chosen)."""
    return f"distill {where}" if where else "distill"


_interrupted = False  # set by the first Ctrl-C
_loading = 0  # how many :func:`importing` blocks are open
_held = False  # a Ctrl-C that came while one was open, raised when it closes


def _on_sigint(signum: int, frame: Any) -> None:
    """The first Ctrl-C: remember it and raise KeyboardInterrupt; later ones are ignored, so that the
    cleanup it starts (partials removed, workers stopped) is not itself interrupted into a traceback.

    One SIGINT is not the user's: OpenBLAS, loaded with numpy, raises SIGINT itself when it cannot start
    its threads, which happens under a memory ceiling (measured: ``ulimit -v 150000``).  A SIGINT that
    lands while a module is being imported with less than :data:`THREAD_HEADROOM` left under a hard
    ceiling is taken for that, and is the out-of-memory error it stands for."""
    global _interrupted, _held
    if _importing(frame) and (left := resources.memory_headroom()) is not None and left[0] < THREAD_HEADROOM:
        raise MemoryError("a library's threads could not start while loading (SIGINT from OpenBLAS)")
    _interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _loading:  # held: see :func:`importing`
        _held = True
        return
    raise KeyboardInterrupt


THREAD_HEADROOM = 512 << 20  # OpenBLAS reserves a buffer of tens of MiB per thread, plus an 8 MiB stack
IMPORT_HINT = ("while loading the command's libraries (numpy, h5py, torch, onnxruntime): no setting lowers that, "
               "only a higher memory ceiling")


def _importing(frame: Any) -> bool:
    """Whether ``frame`` (or a caller of it) runs a module's body: an import, below ``__main__``."""
    while frame is not None and frame.f_globals.get("__name__") != "__main__":
        if frame.f_code.co_name == "<module>":
            return True
        frame = frame.f_back
    return False


def _while_importing(e: BaseException) -> bool:
    """Whether ``e`` was raised while a module was being imported (a module body on its way up; importlib
    hides its own frames from tracebacks, module bodies stay)."""
    return isinstance(e, ImportError) or any(f.name == "<module>" for f in traceback.extract_tb(e.__traceback__))


def _quiet() -> None:
    """From here the command only says its last line and exits: a Ctrl-C now would only tear that up.
    Only in the ``distill`` process: a program that calls :func:`main` (the tests) keeps its signals."""
    if OWN_SIGNALS:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


#: Whether this process is the ``distill`` command, whose SIGINT is this module's to handle.
OWN_SIGNALS = commands._the_program()


def _interrupted_exit(where: str) -> None:
    """Ctrl-C's one line (exit 130), saying what the command had published before it."""
    _quiet()
    done = artifacts.published()
    say(f"{_name(where)}: interrupted; " + (f"published {', '.join(map(str, done))} before it, nothing else"
                                             if done else "nothing was published"))
    sys.exit(130)


@contextlib.contextmanager
def importing(what: str) -> Iterator[None]:
    """Around a command's lazy import of its stage's code (where torch, onnx and onnxruntime load): a
    memory ceiling hit there (a shared library that cannot be mapped, a MemoryError) is one
    ResourceError (exit 7) saying that no setting helps, only a higher ceiling.

    A Ctrl-C while the block runs is held and raised as it closes: a KeyboardInterrupt raised in Python
    code that a native module's initialisation calls (onnx's pybind11 enums) escapes as a C++ exception,
    and the process aborts with ``terminate called`` and a traceback instead of one line (seen once in CI
    of ``tests/faults/test_faults_cli.py::test_ctrl_c_at_random_moments_of_a_cache``)."""
    global _loading, _held
    _loading += 1
    try:
        yield
    except Exception as e:  # ImportError, OSError (a library that cannot be mapped), MemoryError
        if not resources.is_memory_error(e):
            raise
        raise resources.memory_failure(e, IMPORT_HINT.replace("the command's", f"{what} and its")) from None
    finally:
        _loading -= 1
    if _held and not _loading:
        _held = False
        raise KeyboardInterrupt


def _footprint(settings: type, cfg: Any) -> str:
    """The settings class's ``FOOTPRINT`` hint with the values in force (``{batch_size}`` -> 1024)."""
    hint = getattr(settings, "FOOTPRINT", "")
    try:
        return hint.format(**config.to_dict(cfg if cfg is not None else settings()))
    except Exception:  # settings without defaults for every field: the hint without values
        return re.sub(r" \(now \{\w+\}\)", "", hint)


class DefaultGroup(click.Group):
    """A group that runs its ``default`` subcommand when the first argument names no other one
    (``distill cache --teacher ...`` builds; ``distill cache verify FILE`` verifies)."""

    def __init__(self, *args: Any, default: str, **kw: Any):
        super().__init__(*args, **kw)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


#: Every top-level command and the module that defines it (as the attribute of its name, ``-`` -> ``_``).
COMMANDS = {"prepare": "commands.prepare", "jitter": "commands.jitter", "teacher": "commands.teacher",
            "cache": "commands.cache", "student": "commands.student", "export": "commands.export",
            "bench": "commands.bench", "bench-fidelity": "commands.bench"}


class LazyGroup(click.Group):
    """The top-level group: a command's module is imported when the command is looked up (click's
    lazy-loading pattern), so no module here imports every stage's settings.  Its :meth:`main` makes
    every way out one line: click's usage errors, Ctrl-C before a command runs, a memory ceiling hit
    while a command module loads."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        with importing(f"the {name} command"):
            return getattr(importlib.import_module(COMMANDS[name]), name.replace("-", "_"))

    def make_context(self, *args: Any, **kw: Any) -> click.Context:
        try:
            return super().make_context(*args, **kw)
        except KeyboardInterrupt:  # click would print a blank line and "Aborted!"
            raise _Interrupt from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupt from None

    def main(self, args: Any = None, prog_name: str | None = None, **kw: Any) -> Any:
        if OWN_SIGNALS:
            signal.signal(signal.SIGINT, _on_sigint)
        kw.pop("standalone_mode", None)  # always one line and an exit code, whoever calls
        argv = list(sys.argv[1:] if args is None else args)
        where = next((a for a in argv[:1] if a in COMMANDS), "")
        try:
            code = super().main(argv, prog_name or "distill", standalone_mode=False, **kw)
        except click.ClickException as e:  # a usage error: one line, and where to read the usage
            _quiet()
            name = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx is not None else _name(where)
            hint = f" (see {name} --help)" if isinstance(e, click.UsageError) else ""
            say(f"{name}: error: {' '.join(e.format_message().split())}{hint}")
            sys.exit(e.exit_code)
        except (_Interrupt, click.Abort):
            _interrupted_exit(where)
        except ResourceError as e:  # a command module that could not load
            _fail(where, e)
        sys.exit(code if isinstance(code, int) else 0)  # --help and friends return their exit code


class _Interrupt(BaseException):
    """Ctrl-C outside a command's own handling, carried past click (which would answer "Aborted!")."""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Distil a teacher ensemble into a small, fast edge model (Hinton, Vinyals & Dean 2015).

    Stages, in order: prepare (-> jitter) -> teacher -> cache -> student -> export -> bench.
    """

