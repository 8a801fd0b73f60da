"""``python -m shards <command>``: one module per command, each with ``add_parser(subparsers)`` and ``run(ns)``.

To add a command, write ``shards/<name>.py`` with those two functions and add its name to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .manifest import ShardError

COMMANDS = ("build", "verify", "stage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards",
                                     description="WebDataset shards for AlexNet training (docs/design.md section 1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"shards.{name}").add_parser(sub)
    ns = parser.parse_args(argv)
    try:
        return ns.run(ns)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
