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
command imports its stage's code when it runs, so ``distill --help`` and ``distill <stage> --help``
are fast (``tests/unit/test_cli_lazy.py`` checks ``sys.modules``).
"""
from __future__ import annotations

import functools
import importlib
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline import config, resources
from pipeline.errors import PipelineError, UsageError

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
            except PipelineError as e:
                _fail(where, e)
            except KeyboardInterrupt:
                say(f"distill {where}: interrupted; nothing was published")
                sys.exit(130)
            except Exception as e:  # a resource fault becomes exit 7, anything else stays a bug
                err = resources.as_resource_error(e, _footprint(settings, cfg))
                if err is None:
                    raise
                _fail(where, err)

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


def _fail(where: str, e: PipelineError) -> None:
    say(f"distill {where}: error: {' '.join(str(e).split())}")  # always one line
    sys.exit(e.exit_code)


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
    lazy-loading pattern), so no module here imports every stage's settings."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return getattr(importlib.import_module(COMMANDS[name]), name.replace("-", "_"))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Distil a teacher ensemble into a small, fast edge model (Hinton, Vinyals & Dean 2015).

    Stages, in order: prepare (-> jitter) -> teacher -> cache -> student -> export -> bench.
    """

