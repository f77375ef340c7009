"""Stage settings: one frozen dataclass per stage, turned into click options and validated.

Each field carries its help text in ``field(metadata={"help": ...})``; the class docstring is the
command's help.  A settings object can come from command-line options, from a JSON file
(``--config FILE``; options given on the command line win) or from a dict in code: all three go
through :func:`from_dict`, which rejects unknown keys and wrong types.  A smoke run is the same
dataclass with smaller numbers, never a second code path (big_vision's runlocal idea).

A settings class may also carry ``FOOTPRINT`` (a ``ClassVar``, not a setting): which of its settings
lowers the command's memory footprint, with ``{field}`` for the value in force.  An out-of-memory
error of the command ends with it (exit 7, :mod:`commands.main`).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.errors import UsageError

C = TypeVar("C")


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (the text becomes the option's ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; accept only lossless conversions."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"setting {name!r}: expected a list, got {value!r}")
        return tuple(_coerce(name, inner, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"setting {name!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UsageError(f"setting {name!r}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"setting {name!r}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"setting {name!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"setting {name!r}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"setting {name!r}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported setting type {tp!r} for {name}")


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build settings of ``cls`` from ``values``; unknown keys and wrong types are UsageErrors."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise UsageError(f"unknown setting(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {k: _coerce(k, types[k], v) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Settings as a JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def load(cls: type[C], config_file: Path | None, overrides: dict[str, Any],
         renamed: dict[str, str] | None = None, warn: Callable[[str], None] | None = None) -> C:
    """Settings from an optional JSON file, then command-line overrides (None means not given).

    ``renamed`` maps a setting's former name to its name now: the file may still use the former one
    (``warn`` is told so, once per key); giving both names is a UsageError."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{config_file}: cannot read settings: not UTF-8 text (byte {e.start}); a --config "
                             "file is JSON") from None
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{config_file}: cannot read settings: {e}") from None
        if not isinstance(values, dict):
            raise UsageError(f"{config_file}: settings must be a JSON object")
        for old, new in (renamed or {}).items():
            if old in values:
                if new in values:
                    raise UsageError(f"{config_file}: gives both {old!r} and {new!r}, the same setting; keep {new!r}")
                values[new] = values.pop(old)
                if warn is not None:
                    warn(f"{config_file}: setting {old!r} is now {new!r}; the old name is accepted for one more "
                         "release")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, values)


def _click_type(tp: Any) -> Any:
    if typing.get_origin(tp) is tuple:
        return str  # comma-separated list, parsed by _coerce
    return {int: int, float: float, str: str, bool: bool}[tp]


def former_option(old: str) -> str:
    """The keyword a hidden option of a renamed setting's former name passes (see :func:`options`)."""
    return f"former_{old}"


def options(cls: type, renamed: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator adding one ``--option`` per settings field, plus ``--config FILE``.

    Options default to None so that :func:`load` can tell "not given" from "given"; the shown
    default is the dataclass default.  Each former name in ``renamed`` (old -> new) adds a hidden
    ``--old-name`` of the new setting's type, passed as :func:`former_option` ``(old)``.
    """
    types = _field_types(cls)

    def decorate(fn: Callable) -> Callable:
        for old, new in (renamed or {}).items():
            fn = click.option("--" + old.replace("_", "-"), former_option(old), type=_click_type(types[new]),
                              default=None, hidden=True)(fn)
        for f in reversed(dataclasses.fields(cls)):
            tp = types[f.name]
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            if tp is bool:
                decl = [f"{flag}/--no-{f.name.replace('_', '-')}"]
                fn = click.option(*decl, f.name, default=None, help=f"{f.metadata['help']}  [default: {shown}]")(fn)
            else:
                fn = click.option(flag, f.name, type=_click_type(tp), default=None,
                                  help=f"{f.metadata['help']}  [default: {shown}]")(fn)
        fn = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                          default=None, help="JSON file of settings; options given here win.")(fn)
        return fn

    return decorate


def split_settings(cls: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split click kwargs into (settings overrides, everything else)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return ({k: v for k, v in kwargs.items() if k in names},
            {k: v for k, v in kwargs.items() if k not in names})


def require(cond: bool, message: str) -> None:
    """Raise a UsageError with ``message`` unless ``cond`` (for ``__post_init__`` checks)."""
    if not cond:
        raise UsageError(message)


def require_temperatures(temperatures: Any, name: str = "temperature") -> None:
    """Every command's temperature check: :func:`pipeline.soft.check_temperature` (finite and >= its
    floor) on each value, as a UsageError (exit 2), and no temperature given twice (``3,3`` or
    ``2,2.0000001``, one name in a cache).  ``inf`` parses as a float and NaN compares false with
    everything, so ``t > 0`` alone would let them through to a traceback deep in a writer thread."""
    from pipeline.formats.cache import t_key  # a temperature's name in a cache
    from pipeline.soft import check_temperature

    values = temperatures if isinstance(temperatures, (tuple, list)) else (temperatures,)
    for t in values:
        try:
            check_temperature(t)
        except ValueError as e:
            raise UsageError(f"{name}: {e}") from None
    names = [t_key(t) for t in values]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"{name}: T={', '.join(repeated)} given more than once (temperatures are told apart to six "
                         "significant digits)")
