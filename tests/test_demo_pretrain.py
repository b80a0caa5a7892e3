"""The demo's pre-training pass (livethinking.train.demo_pretrain): it lowers the catalogue
loss, is deterministic given the seed, and refuses bad settings."""

import pytest
import torch

from livethinking.data import load_texts
from livethinking.model import CausalLM
from livethinking.tasks.livestream import make_demo
from livethinking.train.config import OptimConfig
from livethinking.train.demo import DemoSize, build_student, build_tokenizer
from livethinking.train.demo_pretrain import PretrainConfig, pretrain_student


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    paths = make_demo(out / "data", num_products=10, questions_per_product=2, listing_products=40,
                      seed=1)
    tokenizer = build_tokenizer(paths.corpus, out / "tokenizer")
    student = build_student(tokenizer, DemoSize(hidden=32, layers=1, experts=2), out / "init",
                            seed=1)
    return out, load_texts(paths.pretrain).items, student


def _config(epochs: int) -> PretrainConfig:
    return PretrainConfig(epochs=epochs, row_tokens=256, rows_per_step=2, seed=1,
                          optim=OptimConfig(lr=3e-3, warmup_steps=2, min_lr_ratio=0.1))


def test_pretraining_lowers_the_loss_and_is_deterministic(setup):
    out, texts, student = setup
    logs = []
    first = pretrain_student(student, texts, out / "a", _config(6), log=logs.append)
    second = pretrain_student(student, texts, out / "b", _config(6), log=lambda _: None)
    losses = [line for line in logs if "loss" in line]
    assert losses, logs
    before, after = (float(x) for x in losses[-1].split("loss ")[1].split(" in ")[0]
                     .split(" -> "))
    assert after < before - 0.5, losses
    a, b = CausalLM.from_pretrained(first), CausalLM.from_pretrained(second)
    init = CausalLM.from_pretrained(student)
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), init.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), init.parameters()))


def test_pretraining_refuses_bad_settings(setup):
    out, _, student = setup
    with pytest.raises(ValueError, match="epochs"):
        PretrainConfig(epochs=0)
    with pytest.raises(ValueError, match="texts"):
        pretrain_student(student, [], out / "c", _config(1), log=lambda _: None)
