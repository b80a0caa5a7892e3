"""Where rollouts come from beyond the in-process engine (floor 5): remote inference
servers spoken to over HTTP with token ids in and out (`ServerPool`), and the trainer's
weights pushed to them after each optimizer step (`WeightPusher` for SGLang's API,
`VllmWeightPusher` for vLLM's), optionally sampled
ahead of training with bounded staleness (`RolloutsAhead`)."""

from livethinking.rollout.ahead import RolloutsAhead
from livethinking.rollout.servers import RemoteSample, ServerDown, ServerPool
from livethinking.rollout.vllm_push import VllmWeightPusher
from livethinking.rollout.weight_push import PushResult, WeightPusher, buckets

__all__ = ["PushResult", "RemoteSample", "RolloutsAhead", "ServerDown", "ServerPool",
           "VllmWeightPusher", "WeightPusher", "buckets"]
