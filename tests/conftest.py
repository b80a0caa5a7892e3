"""Shared test setup.

TRITON_INTERPRET must be set before any module applies @triton.jit, so it is set
here, before the tests import anything of livethinking. Tests run with --import-mode=importlib: the repository root is never
put on sys.path, so they exercise the installed package.
"""

import os
import zlib

import torch

# Interpret Triton on CPU tensors where no GPU exists (torch itself applies no
# @triton.jit at import, so deciding after importing it is early enough).
HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if HAS_CUDA else "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


# Fresh random inputs every run, reproducible: the run's seed is printed in the
# header; LIVETHINKING_TEST_SEED=<seed> replays it.
RUN_SEED = int(os.environ.get("LIVETHINKING_TEST_SEED", torch.seed() % 2**31))


def pytest_report_header(config):
    return f"livethinking test seed: LIVETHINKING_TEST_SEED={RUN_SEED}"


@pytest.fixture
def generator(request):
    """A generator seeded from the run seed and the test's id."""
    return torch.Generator().manual_seed((RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_TEXT = [
    "the red kettle boils water in two minutes and costs forty dollars",
    "does it come in blue? only red for now. what does it cost? how fast does it boil?",
    "Answer viewers of a livestream briefly, from the product document only.",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A directory with a tiny random Qwen3-MoE (fp32), config.json and a byte-level BPE
    tokenizer with a ChatML chat template; eos = <|im_end|>. Built offline, once per run."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from livethinking.model import CausalLM, ModelConfig

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TOKENIZER_TEXT, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    config = ModelConfig(model_type="qwen3_moe", vocab_size=vocab, hidden_size=32,
                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1234)
    model = CausalLM(config).float()
    with torch.no_grad():  # larger than the default init, so the logits are far from flat
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def demo_setup(tmp_path_factory):
    """The synthetic livestream set (6 products), its tokenizer and a tiny random student
    checkpoint: (DemoPaths, tokenizer, student directory)."""
    from livethinking.tasks.livestream import make_demo
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer

    root = tmp_path_factory.mktemp("demo_setup")
    paths = make_demo(root / "data", num_products=6, questions_per_product=4, seed=3)
    tokenizer = build_tokenizer(paths.corpus, root / "tokenizer")
    student = build_student(tokenizer, DemoSize(hidden=32, layers=2, experts=4), root / "student", 0)
    return paths, tokenizer, student
