"""docs/settings.md, generated from the settings dataclasses in `gossipdqn.config`.

    python -m gossipdqn.settings_doc --write docs/settings.md   # regenerate the page
    python -m gossipdqn.settings_doc                            # print it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, NamedTuple

from gossipdqn.config import Config

COMMAND = "python -m gossipdqn.settings_doc --write docs/settings.md"
"""The command that regenerates docs/settings.md (named by the test that finds it stale)."""

_HEADER = f"""\
# Every setting

<!-- Generated from gossipdqn/config.py by `{COMMAND}`; do not edit by hand. -->

Settings are frozen dataclasses in `gossipdqn/config.py`, one TOML table per section:

```toml
name = "acrobot"

[env]
id = "Acrobot-v1"

[learner]
lr = 1e-3
```

A run reads a TOML file (`--config FILE`; without one, the defaults below, which are the
CartPole config) and then `--set section.key=value` overrides, repeatable, where the value is
TOML (`--set network.hidden=[64,64]`, `--set env.id=Acrobot-v1`: a bare word is a string).
An unknown key, a wrong type or a value out of range fails at once, naming the key and what is
expected; a few settings are also checked against each other (`actor.eps_end` at most
`actor.eps_start`, `learner.batch_size` at most `replay.capacity`):

```
$ gossipdqn train --set learner.lr=-1
gossipdqn train: error: learner.lr: expected a value >= 0.0, got -1.0
```

Shipped configs are in `experiments/configs/`. A run writes its resolved settings to
`RUN_DIR/config.toml`, which `--config` reads back unchanged.
"""


class Setting(NamedTuple):
    """One setting as the docs show it."""

    key: str
    type: str
    default: str
    allowed: str
    doc: str


def _toml(value: Any) -> str:
    """A default as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _type(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {_type(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _allowed(meta: typing.Mapping[str, Any]) -> str:
    """The choices or the range a setting must lie in; empty when anything of its type goes."""
    if meta.get("choices") is not None:
        return ", ".join(_toml(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def describe_settings(cls: type = Config, prefix: str = "") -> list[Setting]:
    """Every setting of `cls` and its sections, in declaration order."""
    rows: list[Setting] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_settings(tp, f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        rows.append(
            Setting(prefix + f.name, _type(tp), _toml(f.default), _allowed(meta), meta["doc"])
        )
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: list[Setting]) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in rows:
        allowed = f"`{_cell(s.allowed)}`" if s.allowed else ""
        lines.append(
            f"| `{s.key}` | {s.type} | `{_cell(s.default)}` | {allowed} | {_cell(s.doc)} |"
        )
    return lines


def render_settings() -> str:
    """The whole of docs/settings.md: a heading and one table per section."""
    sections: dict[str, list[Setting]] = {}
    for s in describe_settings():
        section = s.key.split(".")[0] if "." in s.key else ""
        sections.setdefault(section, []).append(s)
    parts = [_HEADER]
    for section, rows in sections.items():
        title = f"## `[{section}]`" if section else "## Top level"
        parts.append("\n".join([title, "", *_table(rows)]) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Print the settings page, or write it to a file with `--write PATH`."""
    parser = argparse.ArgumentParser(
        prog="python -m gossipdqn.settings_doc",
        description="Print docs/settings.md, generated from gossipdqn/config.py.",
        epilog=f"regenerate the page: {COMMAND}",
    )
    parser.add_argument("--write", metavar="PATH", help="write the page here instead of stdout")
    args = parser.parse_args(argv)
    text = render_settings()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
