"""The ``livethinking`` command."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from livethinking.info import collect_report, format_report

    report = collect_report(probe_interpreter=not args.no_interpreter_probe)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    # The C++ CPU ops are the floor every install must have.
    return 0 if report.backend("cpu-c++").usable else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livethinking",
                                     description="Kernels, trainer and inference for small MoE "
                                                 "reasoning models.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, built and usable backends, GPUs")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.add_argument("--no-interpreter-probe", action="store_true",
                      help="skip running a kernel under the Triton interpreter (a few seconds)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
