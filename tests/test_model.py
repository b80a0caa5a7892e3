"""livethinking.model against transformers' Qwen3-MoE / Qwen3 on tiny random fp32 models (CPU)."""

import pytest
import torch
import transformers

from livethinking.model import CausalLM, ModelConfig, StaticKVCache

ATOL = 1e-4

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MOE = dict(BASE, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2)

CASES = {
    # dense layers at 0 (mlp_only) and every odd layer index +1 (sparse step 2); tied; GQA
    "moe_step2_mlp_only_tied": ("qwen3_moe", dict(MOE, decoder_sparse_step=2, mlp_only_layers=[1],
                                                  tie_word_embeddings=True, norm_topk_prob=False)),
    "moe_all_sparse_untied": ("qwen3_moe", dict(MOE, norm_topk_prob=True, mlp_only_layers=[0],
                                                tie_word_embeddings=False, num_key_value_heads=1)),
    "dense_tied": ("qwen3", dict(BASE, tie_word_embeddings=True)),
    "dense_untied_mha": ("qwen3", dict(BASE, tie_word_embeddings=False, num_key_value_heads=4)),
}


def _hf_model(kind, kwargs, seed=0):
    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        config, cls = transformers.Qwen3MoeConfig(**kwargs), transformers.Qwen3MoeForCausalLM
    else:
        config, cls = transformers.Qwen3Config(**kwargs), transformers.Qwen3ForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).float().eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so differences show
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.15 * torch.randn_like(p))
    return model


def _pair(case, seed=0):
    kind, kwargs = CASES[case]
    hf = _hf_model(kind, kwargs, seed)
    ours = CausalLM(ModelConfig.from_dict(hf.config.to_dict())).float().eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _ids(batch, steps, seed=1):
    return torch.randint(0, BASE["vocab_size"], (batch, steps),
                         generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case):
    kind, kwargs = CASES[case]
    hf_config = (transformers.Qwen3MoeConfig if kind == "qwen3_moe" else transformers.Qwen3Config)(**kwargs)
    config = ModelConfig.from_dict(hf_config.to_dict())
    assert config.head_dim == 16 and config.rope_theta == 10000.0
    assert ModelConfig.from_dict(config.to_dict()) == config
    if kind == "qwen3_moe":
        assert config.num_experts == 8 and "num_local_experts" in config.to_dict()
        again = type(hf_config)(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
        assert again.num_experts == 8 and again.mlp_only_layers == hf_config.mlp_only_layers


def test_config_legacy_fields_and_errors():
    legacy = dict(MOE, model_type="qwen3_moe", rope_theta=5e5)
    del legacy["rope_parameters"]
    config = ModelConfig.from_dict(legacy)
    assert config.rope_theta == 5e5 and config.num_experts == 8
    with pytest.raises(ValueError, match="llama"):
        ModelConfig.from_dict(dict(BASE, model_type="llama"))
    with pytest.raises(ValueError, match="gelu"):
        ModelConfig.from_dict(dict(BASE, model_type="qwen3", hidden_act="gelu"))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict(dict(BASE, model_type="qwen3",
                                   rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict(dict(BASE, model_type="qwen3", num_key_value_heads=3))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_dict(dict(MOE, model_type="qwen3_moe", num_experts_per_tok=9))


# ------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    hf, ours = _pair(case)
    ids = _ids(2, 13)
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL
    assert [layer.is_moe for layer in ours.model.layers] == [
        type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]


@pytest.mark.parametrize("case", ["moe_step2_mlp_only_tied", "moe_all_sparse_untied"])
def test_aux_loss_matches_transformers(case):
    hf, ours = _pair(case)
    ids = _ids(3, 9)
    with torch.no_grad():
        expected = hf(ids, output_router_logits=True)
        got = ours.forward_hidden(ids)
    assert len(got.router_logits) == len(expected.router_logits)
    for a, b in zip(got.router_logits, expected.router_logits):
        assert (a - b).abs().max() <= ATOL
    assert abs(got.aux_loss.item() - expected.aux_loss.item()) <= 1e-5
    coef = hf.config.router_aux_loss_coef
    assert torch.allclose(got.weighted_aux_loss, coef * got.aux_loss)


def test_dense_model_has_no_aux_loss():
    _, ours = _pair("dense_tied")
    out = ours.forward_hidden(_ids(1, 5))
    assert out.aux_loss is None and out.router_logits == () and out.weighted_aux_loss is None


def _loss(logits, aux, coef):
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    return (logits * weights).sum() + coef * aux


@pytest.mark.parametrize("case", ["moe_all_sparse_untied", "moe_step2_mlp_only_tied"])
def test_gradients_match_transformers(case):
    hf, ours = _pair(case)
    ids, coef = _ids(2, 11), 0.5
    out = hf(ids, output_router_logits=True)
    _loss(out.logits, out.aux_loss, coef).backward()
    ours_out = ours.forward_hidden(ids)
    _loss(ours.compute_logits(ours_out.hidden_states), ours_out.aux_loss, coef).backward()
    moe_layer = next(i for i, layer in enumerate(ours.model.layers) if layer.is_moe)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.2.self_attn.k_norm.weight", f"model.layers.{moe_layer}.mlp.gate.weight",
             f"model.layers.{moe_layer}.mlp.experts.gate_up_proj",
             f"model.layers.{moe_layer}.mlp.experts.down_proj", "lm_head.weight"]
    hf_params, our_params = dict(hf.named_parameters(remove_duplicate=False)), dict(
        ours.named_parameters(remove_duplicate=False))
    for name in names:
        expected, got = hf_params[name].grad, our_params[name].grad
        scale = expected.abs().max().clamp_min(1.0)
        assert (got - expected).abs().max() <= ATOL * scale, name


# ------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("case", ["moe_step2_mlp_only_tied", "dense_untied_mha"])
def test_packed_forward_equals_separate_documents(case):
    _, ours = _pair(case)
    lengths = [5, 1, 9, 4]
    docs = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = ours.forward_hidden(torch.cat(docs, dim=1), cu_seqlens=cu).hidden_states[0]
        separate = torch.cat([ours.forward_hidden(d).hidden_states[0] for d in docs])
    assert (packed - separate).abs().max() <= ATOL


def test_packed_rejects_bad_cu_seqlens():
    _, ours = _pair("dense_tied")
    with pytest.raises(ValueError, match="rise from 0"):
        ours.forward_hidden(_ids(1, 6), cu_seqlens=torch.tensor([0, 4, 5]))
    with pytest.raises(ValueError, match="single row"):
        ours.forward_hidden(_ids(2, 6), cu_seqlens=torch.tensor([0, 6]))


# ------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("case", ["moe_step2_mlp_only_tied", "dense_tied"])
def test_kv_cache_decoding_matches_full_forward(case):
    _, ours = _pair(case)
    ids, prefill = _ids(2, 12), 5
    cache = StaticKVCache.for_model(ours.config, batch_size=2, max_len=16)
    with torch.no_grad():
        full = ours(ids)
        positions = torch.arange(prefill).expand(2, prefill)
        steps = [ours.forward_step(ids[:, :prefill], positions, cache)]
        for t in range(prefill, ids.shape[1]):
            steps.append(ours.forward_step(ids[:, t:t + 1], torch.full((2, 1), t), cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ATOL
    assert cache.length.tolist() == [12, 12]


def test_a_cache_attends_only_when_it_derives_from_attending_kv_cache():
    from livethinking.model import AttendingKVCache

    _, ours = _pair("dense_tied")
    ids, positions = _ids(2, 6), torch.arange(6).expand(2, 6)

    class HasAttendAttribute(StaticKVCache):  # an `attend` name alone is not the contract
        def attend(self, *args):
            raise AssertionError("a plain KVCache must be used through update()")

    class Attending(AttendingKVCache):
        def __init__(self):
            self.inner, self.calls = StaticKVCache.for_model(ours.config, 2, 8), 0

        def update(self, layer_idx, k, v, positions):
            return self.inner.update(layer_idx, k, v, positions)

        def attend(self, layer_idx, q, k, v, positions):
            self.calls += 1
            k_all, v_all, mask = self.update(layer_idx, k, v, positions)
            return torch.nn.functional.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=mask, enable_gqa=k_all.shape[1] != q.shape[1])

    with torch.no_grad():
        full = ours(ids)
        plain = ours.forward_step(ids, positions, HasAttendAttribute.for_model(ours.config, 2, 8))
        attending = Attending()
        through_attend = ours.forward_step(ids, positions, attending)
    assert (plain - full).abs().max() <= ATOL and (through_attend - full).abs().max() <= ATOL
    assert attending.calls == ours.config.num_hidden_layers
    with pytest.raises(TypeError):
        type("Partial", (AttendingKVCache,), {"update": lambda *a: None})()  # attend missing


# ------------------------------------------------------------------------------- checkpointing
def test_gradient_checkpointing_gives_identical_gradients():
    _, ours = _pair("moe_step2_mlp_only_tied")
    ours.train()
    ids = _ids(2, 10)
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        out = ours.forward_hidden(ids)
        _loss(ours.compute_logits(out.hidden_states), out.aux_loss, 0.1).backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_gradient_checkpointing_saves_less_for_backward():
    """The measured activation memory: the bytes of the tensors autograd keeps for backward
    (saved-tensor hooks; storages counted once), a quarter or less with checkpointing."""
    _, ours = _pair("moe_all_sparse_untied")
    ours.train()
    ids = _ids(2, 64)
    saved = {}
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ours.forward_hidden(ids)
        saved[flag] = sum(storages.values())
        out.hidden_states.sum().backward()
    assert saved[True] * 4 <= saved[False], saved


def test_state_dict_loads_back_into_transformers():
    hf, ours = _pair("moe_all_sparse_untied")
    hf2 = _hf_model(*CASES["moe_all_sparse_untied"], seed=5)
    hf2.load_state_dict(ours.state_dict(), strict=True)
    ids = _ids(1, 7)
    with torch.no_grad():
        assert (hf2(ids).logits - hf(ids).logits).abs().max() == 0


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["moe_step2_mlp_only_tied", "moe_all_sparse_untied"])
def test_bf16_cuda_error_within_budget_of_transformers(case):
    """Ours in bf16 on CUDA (Triton fused_moe) vs fp32: within 2x of transformers' bf16 error."""
    hf, ours = _pair(case)
    ids, cu = _ids(1, 24), torch.tensor([0, 7, 24], dtype=torch.int32)
    with torch.no_grad():
        reference = hf(ids).logits
        hf_bf16 = hf.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()
        ours = ours.to("cuda", torch.bfloat16)
        got = ours(ids.cuda()).float().cpu()
        packed = ours.forward_hidden(ids.cuda(), cu_seqlens=cu.cuda()).hidden_states
        first = ours.forward_hidden(ids[:, :7].cuda()).hidden_states
    budget = (hf_bf16 - reference).abs().max()
    assert (got - reference).abs().max() <= 2 * budget + 1e-2
    assert (packed[:, :7] - first).abs().max() <= 2e-2 * first.abs().max()


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_round_trips_with_transformers(case, tmp_path):
    """transformers save -> our load, and our save -> transformers load: weights bitwise
    equal, logits equal to transformers' within ATOL."""
    kind, kwargs = CASES[case]
    hf = _hf_model(kind, kwargs)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits

    hf.save_pretrained(tmp_path / "hf")
    ours = CausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf_state = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, hf_state[name]), name
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max() <= ATOL

    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=16 << 10)  # several shards
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager").float().eval()
    back_state = back.state_dict()
    for name, tensor in hf_state.items():
        assert torch.equal(back_state[name], tensor), name
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected)


def test_from_pretrained_names_a_missing_shard(tmp_path):
    from livethinking.model.checkpoint import CheckpointError

    kind, kwargs = CASES["moe_all_sparse_untied"]
    ours = CausalLM(ModelConfig.from_dict(_hf_model(kind, kwargs).config.to_dict()))
    ours.save_pretrained(tmp_path / "ckpt", max_shard_bytes=16 << 10)
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        CausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CausalLM.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("case", ["moe_all_sparse_untied", "moe_step2_mlp_only_tied"])
def test_parity_with_the_triton_moe_kernels(case, monkeypatch):
    """The same parity with the experts on the Triton kernels (the interpreter on CPU), as
    they run on a GPU, instead of the ops' CPU path."""
    import livethinking.model.layers as layers
    from livethinking.kernels.fused_moe import fused_moe as triton_fused_moe

    calls = []
    monkeypatch.setattr(layers, "fused_moe", lambda *a, grouped=False: calls.append(1) or triton_fused_moe(*a))
    hf, ours = _pair(case)
    ids = _ids(2, 7)
    out = hf(ids, output_router_logits=True)
    (out.logits.sum() + out.aux_loss).backward()
    ours_out = ours.forward_hidden(ids)
    got = ours.compute_logits(ours_out.hidden_states)
    (got.sum() + ours_out.aux_loss).backward()
    assert calls and (got - out.logits).abs().max() <= ATOL
    moe_layer = next(i for i, layer in enumerate(ours.model.layers) if layer.is_moe)
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    for name, param in ours.named_parameters(remove_duplicate=False):
        if name.startswith(f"model.layers.{moe_layer}.mlp") or name == "model.embed_tokens.weight":
            expected = hf_params[name].grad
            scale = expected.abs().max().clamp_min(1.0)
            assert (param.grad - expected).abs().max() <= ATOL * scale, name
