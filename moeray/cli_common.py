"""What the `moeray` command's modules share: the user-facing error, flag and YAML parsing, and
the default service address (no torch, no Ray: --help and validate-config stay light)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A one-line error for the user; `exit_code` 2 for bad input, 1 for a failure elsewhere."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_bool(text: str) -> bool:
    """`--flag false` must mean False (argparse's type=bool makes any non-empty string True)."""
    if text.strip().lower() not in _BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return _BOOLEANS[text.strip().lower()]


def read_yaml_mapping(path: str) -> dict:
    """A YAML file's top-level mapping; CliError naming the file (and line) when it is missing,
    unreadable or not YAML."""
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CliError(f"config file {path} not found") from None
    except OSError as exc:
        raise CliError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CliError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"{path}: the top level must be a mapping (checkpoint:, engine:, serve:), "
                       f"got a {type(data).__name__}")
    return data


def format_validation_error(exc) -> str:
    """One line per bad field: its dotted path, what is wrong, the value given."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        given = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {err['input']!r})"
        lines.append(f"  {where}: {err['msg']}{given}")
    return "\n".join(lines)
