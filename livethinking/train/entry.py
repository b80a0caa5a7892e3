"""The trainer's command line: ``python -m livethinking.train
rft|grpo|dpo|agent-sft|agent-grpo --config FILE [--resume] [key=value ...]`` (e.g. under
torchrun; the agent commands run in one process).

The ``livethinking rft|grpo|dpo|agent-sft|agent-grpo`` subcommands are these same parsers and runner, borrowed by
``livethinking.cli``; the trainer never imports the command that sits on top of it.
"""

from __future__ import annotations

import argparse
import sys

from livethinking.train.agent import run_agent_grpo, run_agent_sft
from livethinking.train.agent_config import AgentGRPOConfig, AgentSFTConfig
from livethinking.train.config import DPOConfig, GRPOConfig, RFTConfig
from livethinking.train.config_io import ConfigError, load_config
from livethinking.train.dpo import run_dpo
from livethinking.train.grpo import run_grpo
from livethinking.train.rft import run_rft

__all__ = ["COMMANDS", "add_run_arguments", "build_parser", "main", "run_command"]

COMMANDS: dict[str, str] = {  # subcommand -> its one-line help
    "rft": "rejection-sampling fine-tuning of a student on judged teacher samples",
    "grpo": "group-relative policy optimisation with correctness, helpfulness and length "
            "rewards",
    "dpo": "direct preference optimisation on pairs from a file or by pass@N sampling",
    "agent-sft": "SFT of a tool-using agent on expert multi-turn trajectories",
    "agent-grpo": "GRPO of a tool-using agent on trajectories it plays in an environment "
                  "(token or per-turn chunk credit)",
}
RUNNERS = {"rft": (RFTConfig, run_rft), "grpo": (GRPOConfig, run_grpo),
           "dpo": (DPOConfig, run_dpo), "agent-sft": (AgentSFTConfig, run_agent_sft),
           "agent-grpo": (AgentGRPOConfig, run_agent_grpo)}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one training run: ``--config``, ``--resume`` and overrides."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in run.output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted keys nest (optim.lr=1e-5)")


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.command`` (a key of ``COMMANDS``) from ``args.config`` plus
    ``args.overrides``; 0 when the final model is written, 2 (with the reason on stderr)
    for a bad config."""
    cls, run = RUNNERS[args.command]
    try:
        config = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2
    final = run(config, resume=args.resume)
    print(f"{args.command}: final model in {final}")
    return 0


def build_parser(prog: str = "python -m livethinking.train") -> argparse.ArgumentParser:
    """Every command of ``COMMANDS``, each with :func:`add_run_arguments`."""
    parser = argparse.ArgumentParser(prog=prog, description="Train with RFT, GRPO, DPO, or an agent's "
                                                         "SFT and GRPO.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in COMMANDS.items():
        add_run_arguments(commands.add_parser(name, help=text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run; the process exit status."""
    return run_command(build_parser().parse_args(argv))
