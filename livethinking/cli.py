"""The ``livethinking`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

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
    from livethinking.server import AsyncEngine, build_app, default_served_model_name

    overrides = {"max_num_seqs": args.max_num_seqs, "max_waiting": args.max_waiting,
                 "block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
                 "max_model_len": args.max_model_len}
    config = EngineConfig(**{k: v for k, v in overrides.items() if v is not None},
                          enable_prefix_caching=not args.no_prefix_caching,
                          enforce_eager=args.enforce_eager,
                          enable_return_routed_experts=args.enable_return_routed_experts)
    llm = LLM(args.model, dtype=None if args.dtype is None else getattr(torch, args.dtype),
              device=args.device, config=config)
    name = args.served_model_name or default_served_model_name(args.model)
    limits = {} if args.max_request_bytes is None else {"max_request_bytes": args.max_request_bytes}
    api_key = args.api_key or os.environ.get("LIVETHINKING_API_KEY") or None
    if args.enable_weight_updates and api_key is None:
        print("livethinking serve: warning: --enable-weight-updates without --api-key lets "
              "anyone who can reach the server replace the model's weights", file=sys.stderr)
    app = build_app(AsyncEngine(llm.engine), name,
                    max_concurrent_requests=args.max_concurrent_requests,
                    enable_docs=args.enable_docs, enable_weight_updates=args.enable_weight_updates,
                    api_key=api_key, **limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _parse_bytes(text: str) -> int:
    """'80GiB', '141 GiB', '80GB' (10^9), '512MiB' or a plain byte count."""
    units = {"gib": 1024**3, "mib": 1024**2, "tib": 1024**4, "gb": 10**9, "mb": 10**6,
             "tb": 10**12, "b": 1}
    cleaned = text.strip().lower().replace(" ", "")
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if cleaned.endswith(unit):
            return int(float(cleaned[:-len(unit)]) * factor)
    return int(float(cleaned))


def _plan(args: argparse.Namespace) -> int:
    import json as json_module

    import yaml

    from livethinking.model import ModelConfig
    from livethinking.train.config import GRPOConfig, RFTConfig
    from livethinking.train.config_io import ConfigError, load_config
    from livethinking.train.memory_plan import plan_memory

    try:
        gpu_memory = _parse_bytes(args.gpu_memory)
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        algorithm = args.algorithm or ("grpo" if "rollout" in raw or "prompts_per_step" in raw
                                       else "rft")
        config = load_config(GRPOConfig if algorithm == "grpo" else RFTConfig, args.config,
                             args.overrides)
        config_file = Path(config.model) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model: {config_file} not found (a folder with the model's "
                              f"config.json is enough)")
        model_config = ModelConfig.from_dict(json_module.loads(config_file.read_text()))
        plan = plan_memory(config, model_config, gpus=args.gpus, gpu_memory=gpu_memory,
                           layout=args.layout)
    except (ConfigError, ValueError, OSError, yaml.YAMLError) as exc:
        print(f"livethinking plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json_module.dumps(plan.as_dict(), indent=2))
    else:
        s = plan.settings
        print(f"{s['algorithm']} of {s['parameters'] / 1e9:.2f}B parameters on {args.gpus} × "
              f"{gpu_memory / 1024**3:.0f} GiB, {args.layout}; microbatch {s['micro_batch_tokens']} "
              f"tokens, activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}")
        print(plan.table())
    return 0 if plan.fits else 1


def _data_make_demo(args: argparse.Namespace) -> int:
    from livethinking.tasks.livestream import make_demo

    if args.task == "relevance":
        return _data_make_relevance(args)
    if args.task == "shop":
        return _data_make_shop(args)
    try:
        paths = make_demo(args.out, num_products=args.products,
                          questions_per_product=args.questions_per_product,
                          heldout_fraction=args.heldout_fraction,
                          listing_products=args.listing_products,
                          rl_products=args.rl_products, seed=args.seed)
    except ValueError as e:
        print(f"livethinking data make-demo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths.num_train} train, {paths.num_heldout} held-out and {paths.num_rl} RL "
          f"records to {paths.out_dir} (catalogue.json, train.jsonl, heldout.jsonl, rl.jsonl, "
          f"corpus.txt, pretrain.jsonl)")
    return 0


def _data_make_relevance(args: argparse.Namespace) -> int:
    from livethinking.tasks.relevance import make_relevance_demo

    if args.listing_products or args.rl_products:
        print("livethinking data make-demo: error: --listing-products and --rl-products are "
              "livestream options (--task livestream)", file=sys.stderr)
        return 2
    try:
        paths = make_relevance_demo(args.out, num_products=args.products,
                                    queries_per_product=args.questions_per_product,
                                    heldout_fraction=args.heldout_fraction,
                                    dev_fraction=args.dev_fraction, seed=args.seed)
    except ValueError as e:
        print(f"livethinking data make-demo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths.num_train} train, {paths.num_dev} dev and {paths.num_heldout} held-out "
          f"relevance records to {paths.out_dir} (catalogue.json, train.jsonl, dev.jsonl, "
          f"heldout.jsonl, corpus.txt)")
    return 0


def _data_make_shop(args: argparse.Namespace) -> int:
    from livethinking.envs import make_shop_demo

    try:
        paths = make_shop_demo(args.out, num_families=args.families,
                               heldout_families=args.heldout_families,
                               tasks_per_family=args.shoppers_per_family,
                               relabelled_copies=args.relabelled_copies,
                               pretrain_episodes=args.pretrain_episodes, seed=args.seed)
    except ValueError as e:
        print(f"livethinking data make-demo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths.num_train} training shoppers, {paths.num_heldout} held-out shoppers "
          f"of the same families and {paths.num_heldout_new} of unseen families to "
          f"{paths.out_dir} (catalogue.jsonl, train.jsonl, heldout.jsonl, heldout_new.jsonl, "
          f"expert.jsonl: the oracle's {paths.num_expert} trajectories, pretrain.jsonl: "
          f"{paths.num_pretrain} episode texts, corpus.txt)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from livethinking.train import DemoSize, run_demo

    try:
        if args.task == "relevance":
            from livethinking.train.relevance_demo import RelevanceDemoSize, run_relevance_demo

            size = replace(RelevanceDemoSize.preset(args.size), output_format=args.format)
            run_relevance_demo(args.out, size=size, seed=args.seed, threads=args.threads,
                               quiet=args.quiet)
            return 0
        if args.format != "cot":
            raise ValueError("--format post_cot is a relevance setting (--task relevance)")
        if args.task == "shop":
            from livethinking.train.shop_demo import ShopDemoSize, run_shop_demo

            if args.size == "large":
                raise ValueError("--task shop has the sizes quick and default")
            run_shop_demo(args.out, size=ShopDemoSize.preset(args.size), seed=args.seed,
                          threads=args.threads, quiet=args.quiet)
            return 0
        run_demo(args.out, size=DemoSize.preset(args.size), seed=args.seed,
                 threads=args.threads, quiet=args.quiet,
                 teacher_active_params=args.teacher_active_params)
    except (OSError, ValueError) as e:  # an unusable --out, a bad setting: one line, no traceback
        print(f"livethinking demo: error: {e}", file=sys.stderr)
        return 1
    return 0


def _positive(kind):
    """An argparse type: ``kind(text)`` that must be > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got "
                                             f"{text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


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
                                                   "(default: the --model folder's name)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weight dtype (default: the checkpoint's)")
    serve.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present")
    serve.add_argument("--max-num-seqs", type=int, help="sequences decoding at once")
    serve.add_argument("--max-waiting", type=int,
                       help="queued requests beyond which the server answers 429")
    serve.add_argument("--max-concurrent-requests", type=int,
                       help="requests in flight beyond which the server answers 429")
    serve.add_argument("--max-request-bytes", type=int,
                       help="request bodies beyond this size are answered 413 (default 4 MiB: "
                            "a full 128k-token context, JSON-escaped, fits)")
    serve.add_argument("--enable-docs", action="store_true",
                       help="serve /docs, /redoc and /openapi.json (off by default)")
    serve.add_argument("--enable-weight-updates", action="store_true",
                       help="serve SGLang's weight-update endpoints (/init_weights_update_group, "
                            "/update_weights_from_distributed, /update_weights_from_disk, "
                            "/pause_generation, ...); off by default")
    serve.add_argument("--api-key", help="every endpoint wants 'Authorization: Bearer KEY' "
                                         "(default: $LIVETHINKING_API_KEY; none: open)")
    serve.add_argument("--block-size", type=int, help="tokens per KV-cache block")
    serve.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized "
                                                         "by the engine)")
    serve.add_argument("--max-model-len", type=int, help="context length (default: the "
                                                         "model's)")
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    serve.add_argument("--enable-return-routed-experts", action="store_true",
                       help="keep each token's MoE experts, so requests can ask for them "
                            "(return_routed_experts, SGLang's)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)

    plan = commands.add_parser("plan", help="per-GPU memory of an RFT or GRPO config, before "
                                            "a run: fits, or the cheapest change that fits")
    plan.add_argument("--config", required=True, help="the run's YAML config")
    plan.add_argument("--gpus", type=int, default=1, help="training GPUs (FSDP ranks)")
    plan.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB")
    plan.add_argument("--layout", choices=["colocated", "disaggregated"], default="colocated",
                      help="GRPO: rollouts on the training GPUs, or on separate servers")
    plan.add_argument("--algorithm", choices=["rft", "grpo"],
                      help="default: grpo when the config has rollout/prompts_per_step")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", help="key=value config overrides")
    plan.set_defaults(run=_plan)

    from livethinking.train.entry import COMMANDS, add_run_arguments, run_command

    for name, text in COMMANDS.items():  # the trainer's own parsers (python -m livethinking.train)
        sub = commands.add_parser(name, help=text)
        add_run_arguments(sub)
        sub.set_defaults(run=run_command)

    demo = commands.add_parser("demo", help="the whole recipe on synthetic livestream data "
                                            "(or TaoSR1's on relevance, or a shopping agent), "
                                            "on a CPU in minutes")
    demo.add_argument("--task", choices=["livestream", "relevance", "shop"],
                      default="livestream",
                      help="livestream: RFT -> GRPO (LiveThinking); relevance: CoT SFT -> "
                           "pass@N DPO -> difficulty-aware GRPO -> CumPT (TaoSR1); shop: a "
                           "tool-using agent and a simulated shopper, SFT on expert "
                           "trajectories -> multi-turn GRPO with per-turn credit")
    demo.add_argument("--format", choices=["cot", "post_cot"], default="cot",
                      help="relevance: the response format every stage trains and reads: cot "
                           "(reasoning, then label) or post_cot (label first, TaoSR1's deployed "
                           "form, read in one forward; its SFT stage is label-first SFT on "
                           "extra synthetic queries)")
    demo.add_argument("--out", default="livethinking-demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", choices=["quick", "default", "large"], default="default",
                      help="quick: the CI size (a minute); default: minutes on 2 CPU cores; "
                           "large: more products and a bigger student, for a 16-core machine "
                           "or a GPU (about 10 minutes). The knobs are printed and saved in "
                           "results.json")
    demo.add_argument("--quiet", action="store_true",
                      help="no progress bars, stage banners or log lines (errors still print)")
    demo.add_argument("--teacher-active-params", type=_positive(float), default=37e9,
                      help="the teacher stand-in's active parameters in the cost table "
                           "(default 37e9: the paper's 670B teacher, 37B active)")
    demo.add_argument("--threads", type=_positive(int), help="torch CPU threads")
    demo.set_defaults(run=_demo)

    data = commands.add_parser("data", help="synthetic data sets (livestream, relevance, shop)")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    make_demo = data_commands.add_parser("make-demo", help="write a synthetic set (livestream: "
                                                           "catalogue, train, held-out, RL, "
                                                           "tokenizer corpus; relevance: "
                                                           "train, dev, held-out; shop: a "
                                                           "catalogue, shoppers, expert "
                                                           "trajectories)")
    make_demo.add_argument("--out", required=True, help="output directory")
    make_demo.add_argument("--task", choices=["livestream", "relevance", "shop"],
                           default="livestream",
                           help="relevance: queries with graded 1-4 tiers, a CoT reference, "
                                "train/dev/held-out splits (TaoSR1); shop: families of "
                                "near-identical products, simulated shoppers with hidden "
                                "preferences, the oracle agent's trajectories")
    make_demo.add_argument("--families", type=int, default=120,
                           help="shop: product families whose shoppers train")
    make_demo.add_argument("--heldout-families", type=int, default=30,
                           help="shop: product families whose shoppers are held out")
    make_demo.add_argument("--shoppers-per-family", type=int, default=2,
                           help="shop: training shoppers per family")
    make_demo.add_argument("--relabelled-copies", type=int, default=0,
                           help="shop: expert trajectories of each training shopper again, "
                                "under fresh product ids and family names, this many times")
    make_demo.add_argument("--pretrain-episodes", type=int, default=0,
                           help="shop: the oracle's episodes in random relabelled families, "
                                "as plain text for pre-training (pretrain.jsonl)")
    make_demo.add_argument("--dev-fraction", type=float, default=0.1,
                           help="relevance: share of products kept for the dev split")
    make_demo.add_argument("--products", type=int, default=24, help="catalogue size")
    make_demo.add_argument("--questions-per-product", type=int, default=8)
    make_demo.add_argument("--heldout-fraction", type=float, default=0.2,
                           help="share of products kept for held-out prompts")
    make_demo.add_argument("--listing-products", type=int, default=0,
                           help="more training-side products with no questions: their "
                                "catalogue texts join pretrain.jsonl only")
    make_demo.add_argument("--rl-products", type=int, default=0,
                           help="more products asked about in rl.jsonl only (GRPO prompts "
                                "on documents the SFT stage never saw)")
    make_demo.add_argument("--seed", type=int, default=0)
    make_demo.set_defaults(run=_data_make_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
