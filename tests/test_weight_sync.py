"""Weights from a trainer into rollout servers: in-place loading by transformers' names,
flat buckets, and the broadcast to two real ``livethinking serve`` processes on loopback
(gloo), checked bit for bit (weights checksum) and by greedy output against the
in-process engine on the saved model."""

import threading

import httpx2
import pytest
import torch

from livethinking.engine import LLM, SamplingParams
from livethinking.engine.weight_transfer import (broadcast_tensors, destroy_transfer_group,
                                                 flatten_bucket, new_transfer_group,
                                                 parse_dtype, unflatten_bucket)
from livethinking.engine.weight_update import WeightLoader, hf_named_tensors, weights_checksum
from livethinking.model import CausalLM
from serving import free_port, server_processes

KEY = "trainer-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _perturbed(model, seed, scale=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# --- loading in place --------------------------------------------------------------------

def test_loader_fills_fused_experts_from_per_expert_names(tiny_checkpoint):
    source = _perturbed(CausalLM.from_pretrained(tiny_checkpoint), seed=1)
    target = CausalLM.from_pretrained(tiny_checkpoint)
    storages = {n: p.data_ptr() for n, p in target.named_parameters()}
    named = list(hf_named_tensors(source))
    assert any(".experts.3.up_proj.weight" in n for n, _ in named)
    assert not any(n.endswith("gate_up_proj") for n, _ in named)
    assert weights_checksum(target) != weights_checksum(source)
    assert WeightLoader(target).load_(named) == len(named)
    assert weights_checksum(target) == weights_checksum(source)
    assert storages == {n: p.data_ptr() for n, p in target.named_parameters()}  # in place
    # one expert's slice lands where the fused tensor keeps it (gate rows first)
    layer = "model.layers.1.mlp.experts"
    fused = target.get_parameter(f"{layer}.gate_up_proj")
    half = fused.shape[1] // 2
    up = torch.randn_like(fused[5, half:])
    WeightLoader(target).load_([(f"{layer}.5.up_proj.weight", up.double())])  # cast on copy
    torch.testing.assert_close(fused[5, half:], up, rtol=0, atol=0)


@pytest.mark.parametrize("bad, fragment", [
    (("model.layers.0.mlp.nope.weight", torch.zeros(1)), "no weight named"),
    (("model.layers.0.mlp.experts.99.gate_proj.weight", torch.zeros(1)), "no weight named"),
    (("model.norm.weight", torch.zeros(31)), "has shape (31,)"),
    (("model.norm.weight", torch.zeros(32, dtype=torch.int64)), "floating-point"),
])
def test_a_bad_batch_changes_nothing(tiny_checkpoint, bad, fragment):
    model = CausalLM.from_pretrained(tiny_checkpoint)
    before = weights_checksum(model)
    good = [("model.embed_tokens.weight", torch.zeros_like(model.model.embed_tokens.weight))]
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        WeightLoader(model).load_(good + [bad])
    assert weights_checksum(model) == before


@pytest.mark.parametrize("shapes", [[(7, 3), (1,), (0,), (97,)], [(2, 2, 2)]])
def test_flat_bucket_round_trip(shapes):
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64][:len(shapes)]
    tensors = [torch.randn(s, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes)]
    tensors[0] = tensors[0].t() if tensors[0].dim() == 2 else tensors[0]  # non-contiguous
    flat = flatten_bucket(tensors)
    assert flat.dtype == torch.uint8
    assert flat.numel() == sum(t.numel() * t.element_size() for t in tensors)
    back = unflatten_bucket(flat, dtypes, [t.shape for t in tensors])
    for t, b in zip(tensors, back):
        assert b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t)
    with pytest.raises(ValueError, match="bytes"):
        unflatten_bucket(flat[:-1], dtypes, [t.shape for t in tensors])


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("torch.float32") is torch.float32
    for bad in ("int64", "nope", "Tensor"):
        with pytest.raises(ValueError, match="floating-point torch dtype"):
            parse_dtype(bad)


# --- two rollout servers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(tiny_checkpoint):
    with server_processes(tiny_checkpoint, 2, api_key=KEY) as procs:
        yield procs


def _together(calls):
    """Run each zero-argument call in its own thread; their results in order."""
    results = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def _push(servers, group, named, *, flattened, version):
    """The trainer's side of one update: each server is told, then rank 0 broadcasts."""
    names = [n for n, _ in named]
    body = {"names": names, "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named], "weight_version": version,
            "load_format": "flattened_bucket" if flattened else None}
    threads, replies = _together([lambda s=s: s.post("/update_weights_from_distributed", body)
                                  for s in servers])
    broadcast_tensors(group, [t for _, t in named], flattened=flattened)
    for t in threads:
        t.join(120)
    return replies


def test_broadcast_reaches_both_servers_bit_for_bit(servers, tiny_checkpoint, tmp_path):
    port = free_port()
    init = {"master_address": "127.0.0.1", "master_port": port, "world_size": 3,
            "group_name": "weight_update_group", "backend": "gloo"}
    threads, joined = _together([
        lambda s=s, r=r: s.post("/init_weights_update_group", {**init, "rank_offset": r})
        for r, s in enumerate(servers, start=1)])
    group = new_transfer_group(master_address="127.0.0.1", master_port=port, rank=0,
                               world_size=3, group_name="weight_update_group", backend="gloo",
                               timeout_s=120)
    for t in threads:
        t.join(120)
    assert all(r.status_code == 200 and r.json()["success"] for r in joined), joined
    try:
        policy = CausalLM.from_pretrained(tiny_checkpoint)
        prompt = [3, 14, 15, 92, 65]
        for step, flattened in enumerate([False, True, False], start=1):
            _perturbed(policy, seed=100 + step)
            named = list(hf_named_tensors(policy))
            if step == 3:  # one bf16 tensor: sent as bf16, cast into the fp32 model
                named = [(n, t.to(torch.bfloat16)) if n == "model.norm.weight" else (n, t)
                         for n, t in named]
                with torch.no_grad():
                    policy.model.norm.weight.copy_(policy.model.norm.weight.bfloat16())
            replies = _push(servers, group, named, flattened=flattened, version=f"step-{step}")
            assert all(r.status_code == 200 and r.json()["success"] for r in replies), \
                [r.text for r in replies]
            saved = policy.save_pretrained(tmp_path / f"step-{step}")
            fresh = LLM(saved, device="cpu").generate([prompt], [SamplingParams(
                max_tokens=10, temperature=0.0, ignore_eos=True)])[0].outputs[0].token_ids
            for server in servers:
                checksum = httpx2.get(f"{server.url}/get_weights_checksum", headers=AUTH).json()
                assert checksum == {"checksum": weights_checksum(policy),
                                    "weight_version": f"step-{step}"}
                out = server.post("/generate", {"input_ids": prompt, "sampling_params": {
                    "max_new_tokens": 10, "temperature": 0.0, "ignore_eos": True}}).json()
                assert out["output_ids"] == fresh
                assert out["meta_info"]["weight_version"] == f"step-{step}"
        # a batch naming a weight the model lacks is received (the collective stays in
        # step) and refused whole; the next update still works
        before = weights_checksum(policy)
        bad = [("model.norm.weight", torch.zeros(32)), ("model.nope", torch.zeros(2))]
        replies = _push(servers, group, bad, flattened=True, version="bad")
        assert all(r.status_code == 400 and "no weight named" in r.json()["message"]
                   for r in replies)
        for server in servers:
            assert httpx2.get(f"{server.url}/get_weights_checksum",
                              headers=AUTH).json()["checksum"] == before
        replies = _push(servers, group, [("model.norm.weight", policy.model.norm.weight)],
                        flattened=False, version="step-4")
        assert all(r.json()["success"] for r in replies)
    finally:
        destroyed = [s.post("/destroy_weights_update_group", {"group_name": "weight_update_group"})
                     for s in servers]
        destroy_transfer_group(group)
    assert all(r.json()["success"] for r in destroyed)
