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


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from livethinking.engine import LLM, EngineConfig
    from livethinking.server import AsyncEngine, build_app

    overrides = {"max_num_seqs": args.max_num_seqs, "max_waiting": args.max_waiting,
                 "block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
                 "max_model_len": args.max_model_len}
    config = EngineConfig(**{k: v for k, v in overrides.items() if v is not None},
                          enable_prefix_caching=not args.no_prefix_caching,
                          enforce_eager=args.enforce_eager)
    llm = LLM(args.model, dtype=None if args.dtype is None else getattr(torch, args.dtype),
              device=args.device, config=config)
    name = args.served_model_name or args.model
    app = build_app(AsyncEngine(llm.engine), name,
                    max_concurrent_requests=args.max_concurrent_requests)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


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

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server for a model")
    serve.add_argument("--model", required=True, help="checkpoint directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model id clients ask for "
                                                   "(default: the --model path)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weight dtype (default: the checkpoint's)")
    serve.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present")
    serve.add_argument("--max-num-seqs", type=int, help="sequences decoding at once")
    serve.add_argument("--max-waiting", type=int,
                       help="queued requests beyond which the server answers 429")
    serve.add_argument("--max-concurrent-requests", type=int,
                       help="requests in flight beyond which the server answers 429")
    serve.add_argument("--block-size", type=int, help="tokens per KV-cache block")
    serve.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized "
                                                         "by the engine)")
    serve.add_argument("--max-model-len", type=int, help="context length (default: the "
                                                         "model's)")
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
