"""Command-line options, declared once, read from TOML, ``FEDMQ_*`` and flags.

Each option is read in the order docker-compose users expect: the default,
then the TOML file (top-level keys, then the command's own table), then the
``FEDMQ_<NAME>`` environment variable, then the ``--name`` flag. Values are
checked here for type and choices; the config dataclasses check ranges.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError

__all__ = ["Option", "add_options", "resolve_options"]


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


_PARSERS: dict[type, Callable[[str], Any]] = {str: str, int: int, float: float, bool: _bool}


@dataclass(frozen=True)
class Option:
    """One setting: ``--name`` flag, ``FEDMQ_NAME`` variable, ``name`` TOML key."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "FEDMQ_" + self.name.upper()

    def convert(self, value: Any, source: str) -> Any:
        """Parse or type-check ``value`` from ``source``; ConfigError names the field."""
        try:
            if isinstance(value, str) and self.type is not str:
                value = _PARSERS[self.type](value)
            elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if value is not None and (
                not isinstance(value, self.type) or (self.type is int and isinstance(value, bool))
            ):
                raise ValueError(f"expected {self.type.__name__}, got {type(value).__name__}")
        except ValueError as error:
            raise ConfigError(f"{self.name} ({source}): {error}") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{self.name} ({source}): {value!r} is not one of {', '.join(self.choices)}"
            )
        return value


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Declare every option as a flag whose absence is distinguishable (default None)."""
    for option in options:
        default = "" if option.default is None else f" (default: {option.default})"
        choices = f" {{{','.join(option.choices)}}}" if option.choices else ""
        # A bare boolean flag means true (`fedmq bench --suite`); `--suite false` still works.
        bare = {"nargs": "?", "const": "true"} if option.type is bool else {}
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.type.__name__.upper() + choices,
            help=f"{option.help}{default}; env {option.env}",
            **bare,  # type: ignore[arg-type]
        )


def resolve_options(
    command: str,
    options: Sequence[Option],
    flags: argparse.Namespace,
    *,
    config_file: Path | None,
    every_name: frozenset[str] = frozenset(),
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """Merge defaults < TOML < environment < flags into one dict of typed values.

    ``every_name``: the options of all commands, which top-level TOML keys may name.
    """
    by_name = {option.name: option for option in options}
    values: dict[str, Any] = {option.name: option.default for option in options}
    if config_file is not None:
        toml = _read_toml(config_file, command, by_name, every_name | by_name.keys())
        for key, value in toml.items():
            values[key] = by_name[key].convert(value, f"{config_file}")
    for option in options:
        if option.env in environ:
            values[option.name] = option.convert(environ[option.env], option.env)
        flag_value = getattr(flags, option.name, None)
        if flag_value is not None:
            values[option.name] = option.convert(flag_value, option.flag)
    return values


def _read_toml(
    path: Path, command: str, known: Mapping[str, Option], everything: frozenset[str]
) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"config: cannot read {path}: {error}") from None
    commands = ("aggregator", "participant", "demo", "bench", "ctl", "keys")
    merged = {k: v for k, v in document.items() if k not in commands}
    table = document.get(command, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config: [{command}] in {path} must be a table")
    # Top-level keys may belong to another command; a command's own table may not.
    for key, allowed in [(k, everything) for k in merged] + [(k, known.keys()) for k in table]:
        if key not in allowed:
            where = f"[{command}]" if key in table else "top level"
            raise ConfigError(
                f"{key} ({path} {where}): unknown option; allowed: {', '.join(sorted(allowed))}"
            )
    merged.update(table)
    return {k: v for k, v in merged.items() if k in known}
