"""GRPO with two rollout servers: steps/s for ``rollout.max_staleness`` k = 0, 1, 2 side by
side in one run (the ratio to k = 0 is the result), and weight-push GB/s against model size.

    python benchmarks/bench_async_grpo.py                     # CPU, a few minutes
    python benchmarks/bench_async_grpo.py --device cuda --steps 12 --hidden 256 --out-json a.json

Setup: the demo records (``make_demo(num_products=8, questions_per_product=4, seed=0)``),
the demo tokenizer and a tiny random Qwen3-MoE student (``DemoSize(hidden=H, layers=2,
experts=4)``); two ``livethinking serve --enable-weight-updates`` processes on loopback
(``--device`` as given; on CPU each server gets ``--threads`` torch threads, the trainer
the rest); GRPO ``rollout.source: servers``, weight_sync distributed (gloo on CPU, NCCL on
CUDA), P prompts × G samples of at most M tokens per step, one optimizer step per batch.
Each k runs the same steps from the same checkpoint on fresh servers; the first step (the
rollouts' warm-up, the group's rendezvous) is left out, and steps/s = (steps − 1) / (wall
time of steps 2..N). Push GB/s: the median over the run's pushes of bytes / seconds, per
model size (``--push-hidden``), measured with k = 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _servers(checkpoint: Path, count: int, device: str, threads: int):
    procs, urls = [], []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        for i in range(count):
            port = _free_port()
            device_env = {**env, "CUDA_VISIBLE_DEVICES": str(i)} if device == "cuda" else env
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "livethinking", "serve", "--model", str(checkpoint),
                 "--device", device, "--port", str(port), "--enable-weight-updates",
                 "--api-key", KEY, "--log-level", "warning"],
                env=device_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server at {url} exited")
                try:
                    if httpx2.get(f"{url}/health", timeout=2,
                                  headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                        break
                except httpx2.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server at {url} did not start")
                time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)


def _student(root: Path, hidden: int, paths):
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer

    tokenizer = build_tokenizer(paths.corpus, root / "tokenizer")
    return build_student(tokenizer, DemoSize(hidden=hidden, layers=2, experts=4),
                         root / f"student-{hidden}", 0)


def _run(out: Path, student: Path, paths, urls, args, k: int) -> dict:
    from livethinking.train.config import (GRPOConfig, LossConfig, OptimConfig, RolloutConfig,
                                           RunConfig)
    from livethinking.train.demo import SYSTEM_PROMPT
    from livethinking.train.grpo import run_grpo

    config = GRPOConfig(
        model=str(student), train_data=str(paths.train), system_prompt=SYSTEM_PROMPT,
        steps=args.steps, prompts_per_step=args.prompts, updates_per_batch=1,
        dynamic_sampling=False,
        rollout=RolloutConfig(source="servers", servers=urls, api_key=KEY,
                              group_size=args.group, max_tokens=args.max_tokens,
                              max_staleness=k),
        loss=LossConfig(beta=0.0), optim=OptimConfig(lr=1e-5),
        run=RunConfig(output_dir=str(out), seed=0, device=args.device, progress=False,
                      tensorboard=False, plots=False))
    run_grpo(config, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in rows if "push_s" in r]
    return {"k": k, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--push-hidden", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU server")
    parser.add_argument("--out-json")
    args = parser.parse_args()

    import torch

    from livethinking.tasks.livestream import make_demo

    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 2 * args.threads))
    root = Path(tempfile.mkdtemp(prefix="bench-async-grpo-"))
    paths = make_demo(root / "data", num_products=8, questions_per_product=4, seed=0)
    student = _student(root, args.hidden, paths)
    results = []
    for k in (0, 1, 2):
        with _servers(student, 2, args.device, args.threads) as urls:
            began = time.perf_counter()
            result = _run(root / f"k{k}", student, paths, urls, args, k)
            result["wall_s"] = time.perf_counter() - began
        results.append(result)
    pushes = []
    for hidden in args.push_hidden:
        model = student if hidden == args.hidden else _student(root, hidden, paths)
        with _servers(model, 2, args.device, args.threads) as urls:
            out = _run(root / f"push{hidden}", model, paths, urls,
                       argparse.Namespace(**{**vars(args), "steps": 3}), 0)
        pushes.append({"hidden": hidden, "gb": out["steps"][-1]["push_gb"],
                       "gb_per_s": statistics.median(r["push_gb_per_s"] for r in out["steps"]),
                       "push_s": statistics.median(r["push_s"] for r in out["steps"])})

    print(f"# GRPO with 2 rollout servers, {args.device}, {datetime.date.today()}: "
          f"{args.prompts} prompts × {args.group} samples ≤ {args.max_tokens} tokens, "
          f"student H={args.hidden}")
    print("| max_staleness | steps/s | × k=0 | rollout s/step | train s/step | push s/step | "
          "trainer idle s/step | stale groups |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for result in results:
        timed = result["steps"][1:]
        span = sum(r["rollout_s"] + r["train_s"] + r["push_s"] for r in timed)
        rate = len(timed) / span
        base = base or rate
        idle = statistics.fmean(r.get("trainer_idle_s", r["rollout_s"]) for r in timed)
        print(f"| {result['k']} | {rate:.3f} | {rate / base:.2f} | "
              f"{statistics.fmean(r['rollout_s'] for r in timed):.3f} | "
              f"{statistics.fmean(r['train_s'] for r in timed):.3f} | "
              f"{statistics.fmean(r['push_s'] for r in timed):.3f} | {idle:.3f} | "
              f"{sum(r.get('groups_stale', 0) for r in timed):.0f} |")
    print("\n| student H | weights GB | push s | push GB/s |\n|---|---|---|---|")
    for p in pushes:
        print(f"| {p['hidden']} | {p['gb']:.4f} | {p['push_s']:.3f} | {p['gb_per_s']:.3f} |")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"runs": results, "pushes": pushes},
                                                  indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
