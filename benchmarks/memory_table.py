"""The README's memory table: ``livethinking plan``'s verdict for Qwen3-30B-A3B and
Qwen3-4B (their published ``config.json`` dimensions), GRPO (``configs/grpo.yaml``) and RFT
(``configs/rft.yaml``), on 1 and 8 × H100-80GB and H200-141GB, colocated and
disaggregated rollouts.

    python benchmarks/memory_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livethinking.model import ModelConfig  # noqa: E402
from livethinking.train.config import GRPOConfig, RFTConfig  # noqa: E402
from livethinking.train.config_io import load_config  # noqa: E402
from livethinking.train.memory_plan import GiB, plan_memory  # noqa: E402

MODELS = {
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          max_position_embeddings=40960, tie_word_embeddings=False),
    "Qwen3-4B": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560,
                     intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                     tie_word_embeddings=True),
}
GPUS = {"H100-80GB": 80 * GiB, "H200-141GB": 141 * GiB}


def main() -> None:
    print("| model | run | GPUs | rollouts | peak GiB/rank (shipped config) | verdict | "
          "what makes it fit |")
    print("|---|---|---|---|---|---|---|")
    for name, dims in MODELS.items():
        model_config = ModelConfig.from_dict(dims)
        for algorithm, cls in (("GRPO", GRPOConfig), ("RFT", RFTConfig)):
            config = load_config(cls, ROOT / "configs" / f"{algorithm.lower()}.yaml")
            for gpu, memory in GPUS.items():
                for n in (1, 8):
                    layouts = ("colocated", "disaggregated") if algorithm == "GRPO" else ("-",)
                    for layout in layouts:
                        plan = plan_memory(config, model_config, gpus=n, gpu_memory=memory,
                                           layout="colocated" if layout == "-" else layout)
                        verdict = "fits" if plan.fits else f"short {plan.short_by / GiB:.0f} GiB"
                        print(f"| {name} | {algorithm} | {n} × {gpu} | {layout} | "
                              f"{plan.total_per_rank / GiB:.0f} | {verdict} | "
                              f"{'—' if plan.fits else plan.suggestion} |")


if __name__ == "__main__":
    main()
