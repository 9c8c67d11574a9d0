"""The ``circuitwatch`` command: one subcommand per job, each owned by the module that does it.

Each module listed here provides ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``circuitwatch serve`` does not
import torch or vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "report": ("sidecar.discover.report", "print the reference model's induction circuit report"),
    "train-reference": ("sidecar.models.train", "train the bundled reference model"),
    "serve": ("sidecar.server.app", "run the sidecar: gRPC ingest, scoring, /metrics"),
    "demo": ("sidecar.demo", "engine + plugin + sidecar on the bundled default, live table"),
    "models": ("sidecar.models.registry", "install and locate real models (never committed)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="circuitwatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage and exits
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    name, (_, help_text) = argv[0], SUBCOMMANDS[argv[0]]
    command = argparse.ArgumentParser(prog=f"circuitwatch {name}", description=help_text)
    module.add_arguments(command)
    return int(module.run(command.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
