"""``rollout.server_kind: vllm``: the trainer speaks vLLM's native weight-transfer API and
samples through vLLM's ``/v1/completions`` with token ids. Checked against a stand-in
written from vLLM's sources (:mod:`vllm_fake`; vLLM needs GPUs): the unique id vLLM's
ranks unpickle, vLLM's packing, the order of the control-plane calls, and a GRPO run after
whose every push the servers hold the trainer's weights bit for bit (``disk``, and the
``distributed`` protocol with gloo standing in for NCCL)."""

import pickle
import threading
import time

import pytest
import torch

from livethinking.engine import LLM, EngineConfig, SamplingParams
from livethinking.engine.weight_update import weights_checksum
from livethinking.rollout import ServerPool, VllmWeightPusher
from livethinking.rollout.vllm_transfer import (aligned_order, pack, packed_chunks,
                                                pickled_unique_id)
from livethinking.server import AsyncEngine, build_app
from livethinking.train.config import (GRPOConfig, LossConfig, OptimConfig, RolloutConfig,
                                       RunConfig)
from livethinking.train.grpo import GRPOTrainer, run_grpo
from serving import Served
from vllm_fake import FakeVllm, GlooCommunicator, consumer_cuts, install_vllm_unique_id_class

SYSTEM = "Answer the viewer from the product document."


def test_the_unique_id_unpickles_as_vllms_struct():
    install_vllm_unique_id_class()
    from vllm.distributed.device_communicators.pynccl_wrapper import ncclUniqueId

    raw = bytes(torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(1),
                              dtype=torch.uint8).tolist())
    assert any(b >= 128 for b in raw)  # c_byte is signed: high bytes must survive
    loaded = pickle.loads(pickled_unique_id(raw))
    assert type(loaded) is ncclUniqueId
    assert bytes(loaded) == raw
    reference = ncclUniqueId.from_buffer_copy(raw)  # what vLLM's rank 0 would pickle
    assert bytes(pickle.loads(pickle.dumps(reference))) == bytes(loaded)
    with pytest.raises(ValueError, match="128 bytes"):
        pickled_unique_id(raw[:127])


@pytest.mark.parametrize("buffer_bytes", [1, 28, 388, 389, 10_000])
def test_packing_cuts_where_vllms_consumer_does(buffer_bytes):
    g = torch.Generator().manual_seed(buffer_bytes)
    named = [(f"t{i}", torch.randn(shape, generator=g).to(dtype)) for i, (shape, dtype) in
             enumerate([((1,), torch.float32), ((7,), torch.bfloat16), ((97,), torch.float32),
                        ((3, 5), torch.float16), ((2, 2, 2), torch.float32)])]
    named.append(("ids", torch.randint(-9, 9, (6,), generator=g)))
    sizes = [t.numel() * t.element_size() for _, t in named]
    with pytest.raises(RuntimeError, match="divisible"):  # in this order vLLM could not
        pack(named).split(sizes)[2].view(torch.float32)  # view the float32 after 7 bf16
    named = aligned_order(named)
    chunks = packed_chunks(named, buffer_bytes)
    cuts = consumer_cuts([n for n, _ in named], [t.dtype for _, t in named],
                         [list(t.shape) for _, t in named], buffer_bytes)
    assert [[n for n, _ in c] for c in chunks] == [[c[0] for c in cut] for cut in cuts]
    for chunk, cut in zip(chunks, cuts):
        flat = pack(chunk)
        assert flat.dtype == torch.uint8 and flat.numel() == sum(c[3] for c in cut)
        for (name, t), part in zip(chunk, flat.split([c[3] for c in cut])):
            assert torch.equal(part.view(t.dtype).view(t.shape), t), name
    with pytest.raises(ValueError, match="buffer_bytes"):
        packed_chunks(named, 0)


def test_nccl_transfer_refuses_a_cpu_policy_before_any_request(demo_setup):
    pool = ServerPool(["http://127.0.0.1:9"], kind="vllm")  # nothing listens there
    pusher = VllmWeightPusher(pool=pool)
    with pytest.raises(ValueError, match="weight_sync: disk"):
        pusher.push([("w", torch.ones(2))], "1")


@pytest.fixture
def vllm_servers(demo_setup):
    """Two stand-in vLLM servers (nccl backend) over engines of the demo student."""
    made = []

    def start(backend):
        for _ in range(2):
            llm = LLM(demo_setup[2], device="cpu", config=EngineConfig(max_num_seqs=16))
            engine = AsyncEngine(llm.engine)
            fake = FakeVllm(engine, backend=backend)
            app = build_app(engine, "student")
            app.include_router(fake.router())
            made.append((Served(app), fake, llm))
        return made

    yield start
    for served, _, _ in made:
        served.close()


def test_pool_samples_vllms_token_ids_and_logprobs(demo_setup, vllm_servers):
    (served, fake, llm), _ = vllm_servers("nccl")
    pool = ServerPool([served.url], kind="vllm")
    prompt = [5, 17, 29, 41, 3]
    pool.set_version(served.url, "7")
    samples = pool.generate(prompt, {"n": 3, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                     "max_new_tokens": 12, "sampling_seed": 11},
                            eos_token_ids=set(llm.engine.eos_ids))
    reference = LLM(demo_setup[2], device="cpu").generate([prompt], [SamplingParams(
        n=3, temperature=1.0, max_tokens=12, seed=11)])[0].outputs
    assert len(samples) == 3
    for got, want in zip(samples, reference):
        assert got.token_ids == list(want.token_ids)
        assert got.logprobs == pytest.approx([float(lp) for lp in want.logprobs], abs=1e-5)
        assert got.weight_version == "7"
    pool.close()


def test_a_push_waits_for_requests_in_flight_and_holds_new_ones(demo_setup, vllm_servers):
    (served, _, llm), _ = vllm_servers("nccl")
    pool = ServerPool([served.url], kind="vllm")
    server = pool.servers[0]
    server.in_flight = 1  # a request of ours is running
    entered = threading.Event()

    def push():
        with pool.updating([served.url]):
            entered.set()
            time.sleep(0.3)
            pool.set_version(served.url, "1")

    pusher = threading.Thread(target=push)
    pusher.start()
    time.sleep(0.2)
    assert not entered.is_set()  # still waiting for the running request
    pool._done(server)
    assert entered.wait(10)
    samples = pool.generate([5, 17], {"n": 1, "temperature": 0.0, "max_new_tokens": 2},
                            eos_token_ids=set(llm.engine.eos_ids))
    assert samples[0].weight_version == "1"  # sent only after the push ended
    pusher.join()
    pool.close()


def _config(tmp_path, student, paths, urls, **rollout):
    return GRPOConfig(
        model=str(student), train_data=str(paths.train), system_prompt=SYSTEM, steps=3,
        prompts_per_step=4, updates_per_batch=1,
        rollout=RolloutConfig(**{"source": "servers", "servers": urls, "server_kind": "vllm",
                                 "group_size": 4, "max_tokens": 16, "bucket_mb": 0.05,
                                 **rollout}),
        loss=LossConfig(beta=0.0), optim=OptimConfig(lr=1e-2),
        run=RunConfig(output_dir=str(tmp_path / "grpo"), seed=0, progress=False,
                      tensorboard=False, plots=False))


@pytest.mark.parametrize("weight_sync", ["distributed", "disk"])
def test_grpo_drives_vllm_servers_bit_for_bit(tmp_path, demo_setup, vllm_servers, monkeypatch,
                                             weight_sync):
    paths, _, student = demo_setup
    made = vllm_servers("nccl" if weight_sync == "distributed" else "disk")
    fakes = [fake for _, fake, _ in made]
    communicators = []

    def gloo(store, world, device):
        communicators.append(GlooCommunicator(store, world, device))
        return communicators[-1]

    monkeypatch.setattr(VllmWeightPusher, "__init__", _with_communicator(gloo))
    seen = []
    original = GRPOTrainer.push_weights

    def checked(self):
        stats = original(self)
        seen.append((weights_checksum(self.run.model), self.weight_version,
                     [(weights_checksum(llm.engine.model), fake.version)
                      for _, fake, llm in made], stats))
        return stats

    monkeypatch.setattr(GRPOTrainer, "push_weights", checked)
    final = run_grpo(_config(tmp_path, student, paths, [s.url for s, _, _ in made],
                             weight_sync=weight_sync), log=lambda *_: None)
    assert [version for _, version, _, _ in seen] == ["0", "1", "2", "3"]
    for trainer_sum, version, servers, stats in seen:
        assert servers == [(trainer_sum, version)] * 2
        assert stats["push_servers"] == 2 and stats["push_gb"] > 0
    assert len({s for s, _, _, _ in seen}) == 4  # every step moved the weights
    cycle = ["pause:wait", "start", "update", "finish", "resume"]
    for fake in fakes:
        assert fake.calls == ["init"] + cycle * 4  # one group for the whole run
        assert not fake.paused and not fake.updating
    if weight_sync == "distributed":
        assert len(communicators) == 1
        assert [f.unique_ids for f in fakes] == [[communicators[0].unique_id]] * 2
        assert communicators[0].sent > 4  # several packed buffers per push (0.05 MiB)
    prompt = [5, 17, 29, 41]
    fresh = LLM(final, device="cpu").generate([prompt], [SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True)])[0].outputs[0].token_ids
    pool = ServerPool([s.url for s, _, _ in made], kind="vllm")
    for url in pool.urls:
        got = pool.post(url, "/v1/completions", {
            "model": "student", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True})["choices"][0]["token_ids"]
        assert got == list(fresh)
    pool.close()


def _with_communicator(factory):
    original = VllmWeightPusher.__init__

    def init(self, **kwargs):
        original(self, **kwargs, communicator=factory)

    return init
