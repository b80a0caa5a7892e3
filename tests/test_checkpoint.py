"""Checkpoint reading and writing against transformers' own save_pretrained / from_pretrained."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from livethinking.model import checkpoint  # noqa: E402
from livethinking.model.checkpoint import CheckpointError, load_into, load_state_dict, save_checkpoint  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


def tiny_model(kind: str, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "moe":
        config = transformers.Qwen3MoeConfig(**SMALL, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                             decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=tied)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**SMALL, tie_word_embeddings=tied)
        model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # weights well away from zero so a misplaced slice shows
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def logits(model, seed=1):
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same(loaded, reference):
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    model = tiny_model("moe", tied=False)
    path = tmp_path_factory.mktemp("moe")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("kind", ["moe", "dense"])
@pytest.mark.parametrize("tied", [False, True])
def test_reads_transformers_save(tmp_path, kind, tied):
    model = tiny_model(kind, tied)
    model.save_pretrained(tmp_path)
    reference = dict(model.state_dict())
    if tied:
        reference.pop("lm_head.weight")
    assert_same(load_state_dict(tmp_path), reference)
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    half = load_state_dict(tmp_path, dtype=torch.bfloat16, expected_keys=expected)
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert torch.equal(half["model.norm.weight"], reference["model.norm.weight"].bfloat16())


def test_fused_layout_on_disk(moe_dir, tmp_path):
    path, model = moe_dir
    reference = dict(model.state_dict())
    gate_up = reference["model.layers.1.mlp.experts.gate_up_proj"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert torch.equal(gate_up[2, :8], f.get_tensor("model.layers.1.mlp.experts.2.gate_proj.weight"))
        assert torch.equal(gate_up[2, 8:], f.get_tensor("model.layers.1.mlp.experts.2.up_proj.weight"))
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "model.safetensors"))
    assert_same(load_state_dict(tmp_path), reference)  # already-fused keys pass through


@pytest.mark.parametrize("kind", ["moe", "dense"])
@pytest.mark.parametrize("tied", [False, True])
def test_save_loads_in_transformers(tmp_path, kind, tied):
    model = tiny_model(kind, tied)
    out = save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "ckpt")
    if tied:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(model)
    assert torch.equal(logits(again), logits(model))
    assert_same(load_state_dict(out), {k: v for k, v in model.state_dict().items()
                                       if not (tied and k == "lm_head.weight")})


def test_sharded_round_trip(tmp_path):
    model = tiny_model("moe", tied=False)
    out = save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "ckpt", max_shard_bytes=4096)
    index = json.loads((out / checkpoint.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    assert_same(load_state_dict(out), dict(model.state_dict()))
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("tied", [False, True])
def test_load_into_meta_model(tmp_path, tied):
    model = tiny_model("moe", tied)
    save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "ckpt", max_shard_bytes=8192)
    with torch.device("meta"):
        empty = transformers.Qwen3MoeForCausalLM(model.config).eval()
    still_meta = load_into(empty, tmp_path / "ckpt", dtype=torch.float32, device="cpu")
    assert still_meta and all("rotary_emb" in n for n in still_meta)
    empty.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    assert not any(p.is_meta for p in empty.parameters())
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == tied
    assert torch.equal(logits(empty), logits(model))


def test_save_replaces_existing_directory(tmp_path):
    model = tiny_model("dense", tied=True)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert not (tmp_path / "ckpt" / "stale.txt").exists()


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = tiny_model("moe", tied=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("old")
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "ckpt", max_shard_bytes=4096)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert os.listdir(tmp_path / "ckpt") == ["keep.txt"]
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "new", max_shard_bytes=4096)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.fixture
def sharded(tmp_path):
    model = tiny_model("moe", tied=False)
    out = save_checkpoint(model.state_dict(), model.config.to_dict(), tmp_path / "ckpt", max_shard_bytes=4096)
    index = json.loads((out / checkpoint.INDEX_NAME).read_text())
    return out, index, model


def test_error_missing_shard(sharded):
    out, index, _ = sharded
    shard = index["weight_map"]["model.layers.1.mlp.gate.weight"]
    (out / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        load_state_dict(out)


def test_error_truncated_shard(sharded):
    out, index, _ = sharded
    shard = out / index["weight_map"]["model.norm.weight"]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 16)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        load_state_dict(out)


def test_error_key_listed_but_absent(sharded):
    out, index, _ = sharded
    index["weight_map"]["model.layers.9.extra.weight"] = index["weight_map"]["model.norm.weight"]
    (out / checkpoint.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.extra\.weight.*absent"):
        load_state_dict(out)


def layer1_without_expert(path, expert):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if f"layers.1.mlp.experts.{expert}." not in k}


def test_error_missing_expert(moe_dir, tmp_path):
    path, model = moe_dir
    save_file(layer1_without_expert(path, 2), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"expert 2 of 'model\.layers\.1\.mlp\.experts'.*experts\.2\.gate_proj"):
        load_state_dict(tmp_path)
    # a missing last expert is only visible against the expected shapes
    save_file(layer1_without_expert(path, 3), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert load_state_dict(tmp_path)["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == 3
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"expert 3 of 'model\.layers\.1\.mlp\.experts'"):
        load_state_dict(tmp_path, expected_keys=expected)


def test_error_shape_and_unexpected_and_missing(moe_dir):
    path, model = moe_dir
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = dict(expected, **{"model.layers.1.mlp.experts.down_proj": (4, 16, 9)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*down_proj.*\(4, 16, 8\).*\(4, 16, 9\)"):
        load_state_dict(path, expected_keys=bad)
    fewer = {k: v for k, v in expected.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected key 'model\.norm\.weight'"):
        load_state_dict(path, expected_keys=fewer)
    with pytest.raises(CheckpointError, match=r"missing keys \['model\.extra'\]"):
        load_state_dict(path, expected_keys=dict(expected, **{"model.extra": (1,)}))


def test_error_pickle_only_directory(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled checkpoints.*not read"):
        load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_state_dict(tmp_path / "pytorch_model.bin")
