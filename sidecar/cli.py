"""The ``circuitwatch`` command: one subcommand per job, each owned by the module that does it.

Each module listed here provides ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``circuitwatch serve`` does not
import torch or vLLM. A group (``circuitwatch discover heads``) is a second level of the same.
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
    "probe-train": ("sidecar.discover.probe_train", "train linear behaviour probes; write a spec"),
    "calibrate": ("sidecar.discover.calibrate", "set verdict thresholds at a target FPR"),
    "stack": ("sidecar.stack", "local engine + sidecar + Prometheus (rules) + Alertmanager"),
}
GROUPS = {
    "discover": (
        "offline circuit discovery on any supported model",
        {
            "heads": (
                "sidecar.discover.heads",
                "induction and previous-token heads: scores, ablations, report, draft spec",
            ),
            "patch": (
                "sidecar.discover.patching",
                "activation and attribution patching on a task of prompt pairs",
            ),
        },
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="circuitwatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for name, (help_text, verbs) in GROUPS.items():
        group = sub.add_parser(name, help=help_text, add_help=False)
        group_sub = group.add_subparsers(dest="verb", metavar="VERB", required=True)
        for verb, (_, verb_help) in verbs.items():
            group_sub.add_parser(verb, help=verb_help, add_help=False)
    if argv and argv[0] in GROUPS and len(argv) > 1 and argv[1] in GROUPS[argv[0]][1]:
        name, rest = f"{argv[0]} {argv[1]}", argv[2:]
        module_name, help_text = GROUPS[argv[0]][1][argv[1]]
    elif argv and argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
        module_name, help_text = SUBCOMMANDS[argv[0]]
    else:
        parser.parse_args(argv)  # prints usage (or the group's) and exits
        return 2
    module = importlib.import_module(module_name)
    command = argparse.ArgumentParser(prog=f"circuitwatch {name}", description=help_text)
    module.add_arguments(command)
    return int(module.run(command.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
