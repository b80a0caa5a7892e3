"""Multi-turn trajectories: an agent (the engine's policy) and environments, turn by turn.

Each turn's prompt is the previous turn's prompt + the model's tokens exactly as sampled +
the environment's reply rendered by the checkpoint's chat template (:class:`TurnRenderer`),
so the previous turn's KV is a prefix of the next prompt and the engine's prefix cache
serves the whole history (each turn records ``cached_tokens``, the engine's count). All
trajectories run at once: every waiting turn is a request of the engine's continuous
batch, and an environment steps as soon as its model turn finishes.

A trajectory keeps the opening prompt and every token after it, with ``model_mask`` 1 on
the model's own tokens only (tool results and user turns are 0, as is an end-of-turn token
the rollout had to add after a turn cut by its token limit), ``chunk_ids`` (the model turn
each model token belongs to, −1 elsewhere), the sampler's log-probs on model tokens and,
when asked, the experts each turn's request routed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livethinking.model.prompt import encode_chat

__all__ = ["Trajectory", "TrajectoryConfig", "Turn", "TurnRenderer", "run_trajectories",
           "tokenize_conversation"]

_ANCHOR = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]  # fixed


@dataclass(kw_only=True, slots=True)
class TrajectoryConfig:
    max_turns: int = 8  # model turns
    max_turn_tokens: int = 64  # sampled tokens per turn
    max_total_tokens: int = 1024  # opening prompt + everything after it
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_turn_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(slots=True)
class Turn:
    start: int  # the model's first token, as an index into Trajectory.token_ids
    end: int  # one past its last sampled token
    prompt_tokens: int  # the length of this turn's prompt
    cached_tokens: int  # of them, served by the prefix cache
    finish_reason: str
    routed_experts: object = None  # (prompt_tokens + sampled − 1, MoE layers, k) when asked


@dataclass(slots=True)
class Trajectory:
    task: object
    prompt_ids: list[int]  # the opening prompt (system, user)
    token_ids: list[int] = field(default_factory=list)  # every token after it
    model_mask: list[int] = field(default_factory=list)  # 1: the model's own token
    chunk_ids: list[int] = field(default_factory=list)  # its model turn; −1: environment
    logprobs: list[float] = field(default_factory=list)  # the sampler's; 0 elsewhere
    turns: list[Turn] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # the conversation, as text
    reward: float = 0.0
    info: dict = field(default_factory=dict)
    end: str = ""  # "done" (the environment ended it), "max_turns" or "max_tokens"

    @property
    def num_model_tokens(self) -> int:
        return sum(self.model_mask)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)


class TurnRenderer:
    """The token ids between a model turn and the next: the template's text after the
    turn's end-of-turn token, the environment's messages, the generation prompt. Computed
    with the checkpoint's own template by rendering a fixed (user, assistant) pair followed
    by the new messages and keeping what follows the assistant's end-of-turn token (the
    eos that comes after the user turn's): templates that render a last assistant turn
    differently from an earlier one (Qwen3 adds an empty think block to the last) are
    handled, since only the text after that token is kept."""

    def __init__(self, tokenizer, tools: list[dict] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools or None
        self.end_of_turn = tokenizer.eos_token_id
        user = encode_chat(tokenizer, _ANCHOR[:1], add_generation_prompt=False)
        if self.end_of_turn is None or self.end_of_turn not in user:
            raise ValueError("the chat template does not end a turn with the tokenizer's eos "
                             "token; cannot join turns by token ids")
        self._user_ends = user.count(self.end_of_turn)  # a default system turn counts too

    def opening(self, messages: list[dict]) -> list[int]:
        extra = {"tools": self.tools} if self.tools else {}
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True, **extra)

    def between(self, messages: list[dict], *, add_generation_prompt: bool = True
                ) -> list[int]:
        """Ids after an end-of-turn token: the template's tail, ``messages``, and (when
        asked) the next assistant turn's opening."""
        full = encode_chat(self.tokenizer, _ANCHOR + list(messages),
                           add_generation_prompt=add_generation_prompt)
        ends = [i for i, t in enumerate(full) if t == self.end_of_turn]
        if len(ends) <= self._user_ends:
            raise ValueError("the chat template did not close the assistant turn with the eos "
                             "token; cannot join turns by token ids")
        return full[ends[self._user_ends] + 1:]


def tokenize_conversation(renderer: TurnRenderer, messages: list[dict]
                          ) -> tuple[list[int], list[int], list[int], list[int]]:
    """A finished conversation (opening messages, then assistant turns and environment
    replies) as (opening prompt ids, token ids after it, model mask, chunk ids), laid out
    exactly as :func:`run_trajectories` lays out its trajectories (each assistant turn's
    text encoded, then the end-of-turn token): the SFT form of an expert's trajectory."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise ValueError("the conversation has no assistant turn")
    prompt = renderer.opening(messages[:first])
    tokens, mask, chunks = [], [], []
    turn, i = 0, first
    while i < len(messages):
        ids = renderer.tokenizer.encode(messages[i]["content"], add_special_tokens=False)
        ids.append(renderer.end_of_turn)
        tokens += ids
        mask += [1] * len(ids)
        chunks += [turn] * len(ids)
        j = i + 1
        while j < len(messages) and messages[j]["role"] != "assistant":
            j += 1
        if j < len(messages):  # environment messages, then the next turn's opening
            between = renderer.between(messages[i + 1:j])
            tokens += between
            mask += [0] * len(between)
            chunks += [-1] * len(between)
        turn, i = turn + 1, j
    return prompt, tokens, mask, chunks


@dataclass(eq=False, slots=True)
class _Running:
    index: int
    trajectory: Trajectory
    env: object
    seed: int


def run_trajectories(llm, renderer: TurnRenderer, envs: list, tasks: list,
                     config: TrajectoryConfig, seeds: list[int]) -> list[Trajectory]:
    """One trajectory per (environment, task, seed), all stepped concurrently through
    ``llm``'s engine (an :class:`~livethinking.engine.LLM`); in input order. Turn t of
    trajectory i samples with seed ``seeds[i] · 1009 + t``. A trajectory ends when its
    environment says done, after ``max_turns`` model turns, or when the next prompt would
    leave no room for a sampled token within ``max_total_tokens`` (or the engine's
    context, if shorter)."""
    from livethinking.engine import SamplingParams

    if not len(envs) == len(tasks) == len(seeds):
        raise ValueError(f"envs, tasks and seeds must have one entry per trajectory; got "
                         f"{len(envs)}, {len(tasks)}, {len(seeds)}")
    engine = llm.engine
    eos = set(engine.eos_ids)
    limit = min(config.max_total_tokens, engine.max_model_len)  # the engine's context too
    runs: dict[str, _Running] = {}
    waiting: list[tuple[_Running, list[int]]] = []
    done: dict[int, Trajectory] = {}
    for index, (env, task, seed) in enumerate(zip(envs, tasks, seeds)):
        messages = env.reset(task)
        trajectory = Trajectory(task, renderer.opening(messages), messages=list(messages))
        if len(trajectory.prompt_ids) >= limit:
            raise ValueError(f"task {getattr(task, 'id', task)!r}: the opening prompt has "
                             f"{len(trajectory.prompt_ids)} tokens; max_total_tokens (and the "
                             f"engine's context) allow {limit}")
        waiting.append((_Running(index, trajectory, env, seed), trajectory.prompt_ids))
    counter = 0

    def submit():
        nonlocal counter
        while waiting and engine.has_room():
            run, prompt = waiting.pop(0)
            turn = len(run.trajectory.turns)
            budget = min(config.max_turn_tokens, limit - len(prompt))
            params = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                    top_k=config.top_k, max_tokens=budget,
                                    seed=run.seed * 1009 + turn, output_kind="final_only",
                                    return_routed_experts=config.return_routed_experts)
            request_id = f"trajectory-{id(runs)}-{counter}"
            counter += 1
            engine.add_request(request_id, prompt, params)
            runs[request_id] = run

    try:
        submit()
        while runs:
            for output in engine.step():
                if not output.finished or output.request_id not in runs:
                    continue
                run = runs.pop(output.request_id)
                follow = _advance(run, output, renderer, config, eos, limit)
                if follow is None:
                    done[run.index] = run.trajectory
                else:
                    waiting.append((run, follow))
            submit()
    finally:
        for request_id in runs:
            engine.abort_request(request_id)
    return [done[i] for i in range(len(tasks))]


def _advance(run: _Running, output, renderer: TurnRenderer, config: TrajectoryConfig,
             eos: set[int], limit: int) -> list[int] | None:
    """Record the finished model turn, step the environment; the next prompt, or None when
    the trajectory ended."""
    t = run.trajectory
    sample = output.outputs[0]
    sampled = list(sample.token_ids)
    start = len(t.token_ids)
    t.token_ids += sampled
    t.model_mask += [1] * len(sampled)
    t.chunk_ids += [len(t.turns)] * len(sampled)
    t.logprobs += list(sample.logprobs) if sample.logprobs is not None else [0.0] * len(sampled)
    t.turns.append(Turn(start, len(t.token_ids), len(output.prompt_token_ids),
                        output.num_cached_tokens, sample.finish_reason, sample.routed_experts))
    t.messages.append({"role": "assistant", "content": sample.text})
    result = run.env.step(sample.text)
    t.messages += result.observation
    t.reward = float(result.reward)
    t.info = dict(result.info)
    if result.done:
        t.end = "done"
        return None
    if len(t.turns) >= config.max_turns:
        t.end = "max_turns"
        return None
    closing = [] if sampled and sampled[-1] in eos else [renderer.end_of_turn]
    follow = closing + renderer.between(result.observation)
    if len(t) + len(follow) >= limit:
        t.end = "max_tokens"
        return None
    t.token_ids += follow
    t.model_mask += [0] * len(follow)
    t.chunk_ids += [-1] * len(follow)
    t.logprobs += [0.0] * len(follow)
    return t.prompt_ids + t.token_ids
