"""Typed settings: a dataclass is the single place for each default and its help text.

`add_arguments` turns a dataclass into command-line flags (each accepted with underscores and
with hyphens); `from_args` builds the dataclass back. Types are checked by argparse, so a wrong
type or an unknown flag is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from typing import Any


def field(default: Any, help: str, choices: tuple | None = None, bounds: str | None = None,  # noqa: A002
          **kwargs: Any) -> Any:
    """A dataclass field with its help text, allowed values and numeric bounds (a key of BOUNDS)."""
    metadata = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


BOUNDS = {  # rule -> (test, what the value must be)
    ">=0": (lambda v: v >= 0, "at least 0"),
    ">=1": (lambda v: v >= 1, "at least 1"),
    ">0": (lambda v: v > 0, "above 0"),
    "0..1": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "0..<1": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "0<..<1": (lambda v: 0 < v < 1, "above 0 and below 1"),
    "8x": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8 (the VAE divides images by 8)"),
    "seed": (lambda v: 0 <= v < 2**32, "from 0 to 4294967295 (numpy and torch take unsigned 32-bit seeds)"),
}


def check_bounds(*settings: Any) -> None:
    """Every number outside its field's bounds, in one line (None, a value not given, passes)."""
    from sdtune.errors import UserError

    problems = []
    for setting in settings:
        for f in dataclasses.fields(setting):
            rule, value = f.metadata.get("bounds"), getattr(setting, f.name)
            if rule and value is not None and not BOUNDS[rule][0](value):
                hint = " (a fraction: 0.2 means 20%)" if rule.startswith("0") and value > 1 else ""
                shown = f"{value:g}" if isinstance(value, float) else value
                problems.append(f"--{f.name} {shown} must be {BOUNDS[rule][1]}{hint}")
    if problems:
        raise UserError("; ".join(problems))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the entry points' usage runs to 80 lines and buried the message.
    A misspelt flag is given the nearest real one."""

    def error(self, message: str):
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [option for action in self._actions for option in action.option_strings]
            groups: list[list[str]] = []  # a flag with the values after it
            for arg in unknown.group(1).split():
                if arg.startswith("--") or not groups:
                    groups.append([arg])
                else:
                    groups[-1].append(arg)
            words = []
            for group in groups:
                flag = group[0]
                close = difflib.get_close_matches(flag.split("=")[0], flags, n=1) if flag.startswith("--") else []
                words.append(" ".join(group) + (f" (did you mean {close[0]}?)" if close else ""))
            message = f"unrecognized arguments: {', '.join(words)}"
        self.exit(2, f"error: {message} ({self.prog} --help lists every flag)\n")


def _flag_type(annotation: Any) -> tuple[Any, str | None]:
    """(argparse type, nargs) for a field annotation such as `int`, `str | None`, `list[str]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return args[0], "+"
    if args:  # Optional[X] / X | None
        return _flag_type(args[0])
    return annotation, None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _ListFlag(argparse.Action):
    """A list flag; given twice, the last one wins (so a wrapper's defaults can be overridden), and
    the user is told, since `--prompt A --prompt B` looks like two prompts."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not self.default:
            print(f"note: {option_string} was given more than once (a wrapper script may pass it too): the last "
                  f"one is used ({' '.join(map(str, values))}); several values go after one {option_string}",
                  file=sys.stderr)
        setattr(namespace, self.dest, list(values))


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field: `--name_with_underscores` and `--name-with-hyphens` both work."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        kind, nargs = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: "95% intervals" broke --help
        if kind is bool:
            # `--flag` turns it on, `--flag false` turns it off: shell wrappers pass values.
            group.add_argument(*names, dest=f.name, type=_parse_bool, nargs="?", const=True, default=default, help=help_text)
        else:
            group.add_argument(
                *names, dest=f.name, type=kind, nargs=nargs, default=default,
                choices=f.metadata.get("choices"), help=help_text, **({"action": _ListFlag} if nargs else {}),
            )


def from_args(cls: type, args: argparse.Namespace) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)
