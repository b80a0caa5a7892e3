"""Where rollouts come from beyond the in-process engine (floor 5): remote inference
servers spoken to over HTTP with token ids in and out (`ServerPool`), and the trainer's
weights pushed to them after each optimizer step (`WeightPusher` for SGLang's API,
`VllmWeightPusher` for vLLM's), optionally sampled
ahead of training with bounded staleness (`RolloutsAhead`); multi-turn trajectories of an
agent and its environments (`run_trajectories`)."""

from livethinking.rollout.ahead import RolloutsAhead
from livethinking.rollout.servers import RemoteSample, ServerDown, ServerPool
from livethinking.rollout.trajectory import (Trajectory, TrajectoryConfig, TurnRenderer,
                                             run_trajectories, tokenize_conversation)
from livethinking.rollout.vllm_push import VllmWeightPusher
from livethinking.rollout.weight_push import PushResult, WeightPusher, buckets

__all__ = ["PushResult", "RemoteSample", "RolloutsAhead", "ServerDown", "ServerPool",
           "Trajectory", "TrajectoryConfig", "TurnRenderer", "VllmWeightPusher",
           "WeightPusher", "buckets", "run_trajectories", "tokenize_conversation"]
