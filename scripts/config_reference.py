"""Print (or check) the configuration reference table in README.md from the CLI's options.

python scripts/config_reference.py          # print the table
python scripts/config_reference.py --write  # replace it in README.md
python scripts/config_reference.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedmq.cli import COMMANDS

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def table() -> str:
    names: dict[str, list[str]] = {}
    options = {}
    for command, opts in COMMANDS.items():
        for option in opts:
            names.setdefault(option.name, []).append(command)
            options.setdefault(option.name, option)
    lines = [
        "| option (`--flag`, `FEDMQ_*`, TOML key) | type | default | commands | meaning |",
        "|---|---|---|---|---|",
    ]
    defaults: dict[str, dict[str, object]] = {}
    for command, opts in COMMANDS.items():
        for option in opts:
            defaults.setdefault(option.name, {})[command] = option.default
    for name, option in options.items():
        kind = "|".join(option.choices) if option.choices else option.type.__name__
        default = "" if option.default is None else f"`{option.default}`"
        # A command with its own default says so: "`5` (bench: `1`)".
        others = [
            f"{command}: `{value}`" if value is not None else f"{command}: none"
            for command, value in defaults[name].items()
            if value != option.default
        ]
        if others:
            default = f"{default} ({', '.join(others)})".strip()
        lines.append(
            f"| `{option.flag}` `{option.env}` `{name}` | {kind} | {default} "
            f"| {', '.join(names[name])} | {option.help} |"
        )
    return "\n".join(lines)


def main() -> int:
    text = README.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    fresh = text[:start] + "\n" + table() + "\n" + text[stop:]
    if "--write" in sys.argv:
        README.write_text(fresh)
    elif "--check" in sys.argv:
        if fresh != text:
            print("README.md's configuration reference is stale: run this script with --write")
            return 1
    else:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
