"""What the engine/trainer benchmark scripts share: model shapes, a random-weight model
built straight on the device, device sync, and the (device, commit) header of a result.

Imported by the scripts next to it (``python benchmarks/bench_ttft.py`` puts this folder
on ``sys.path``); not a test module.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from livethinking.model import CausalLM, ModelConfig
from livethinking.model.layers import RotaryEmbedding

__all__ = ["DTYPES", "MODELS", "random_model", "run_header", "sync"]

MODELS = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
    "30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                    norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A CausalLM allocated on ``device`` in ``dtype`` (meta, then to_empty: no CPU copy),
    norms 1 and matrices N(0, 0.02²)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0) if param.dim() == 1 else param.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_header(device: torch.device) -> tuple[str, str]:
    """(device name with CPU thread count, git commit with +dirty) for a result's header."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"CPU {name}, threads={torch.get_num_threads()}"
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here).stdout
        commit += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return name, commit
