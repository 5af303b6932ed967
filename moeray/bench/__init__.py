"""Benchmarks: `moeray bench <name>` or `python -m moeray.bench.<name>`.

Each module provides add_arguments(parser) and run(args) -> result dict; these helpers are the
parts they share (the JSON file, the standalone entry point).
"""

from __future__ import annotations

import argparse
import json
import sys


def write_json(path: str | None, result: dict) -> None:
    """The result as JSON at `path` (nothing when None); numpy scalars and the like via str."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)


def standalone(name: str, doc: str, add_arguments, run, argv: list[str] | None = None) -> dict:
    """`python -m moeray.bench.<name>`: parse, record the command line, run."""
    parser = argparse.ArgumentParser(prog=f"moeray bench {name}", description=doc.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = f"python -m moeray.bench.{name} " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(args)
