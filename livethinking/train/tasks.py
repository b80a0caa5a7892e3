"""The task a run trains on: how its records load, how a record becomes a prompt, which
rule judges score a response. ``livestream`` (the default: a product document, the chat, a
viewer's question) and ``relevance`` (TaoSR1: a query and a product document, a 1-4 tier
with its reasoning, in the ``cot`` or label-first ``post_cot`` format)."""

from __future__ import annotations

from dataclasses import dataclass

from livethinking.train.config import JudgeConfig

__all__ = ["TASKS", "Task", "task_of"]

TASKS = ("livestream", "relevance")


@dataclass(frozen=True, slots=True)
class Task:
    """One task with the run's prompt settings bound (``system_prompt``, ``output_format``)."""

    name: str = "livestream"
    system_prompt: str | None = None
    output_format: str = "cot"  # relevance: "cot" (reasoning, then label) or "post_cot"
    partial_credit: bool = False  # relevance: 1 − |pred − gold| / 3 instead of exact label
    prompt_layout: str = "default"  # relevance: or "query_doc_query" (prompt.PROMPT_LAYOUTS)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.name!r}")
        if self.output_format not in ("cot", "post_cot"):
            raise ValueError(f"output_format must be cot or post_cot, got "
                             f"{self.output_format!r}")
        if self.name == "livestream" and self.output_format != "cot":
            raise ValueError("output_format post_cot is a relevance setting (task: relevance)")

    def load(self, path, *, on_error: str = "fail") -> list:
        """The records of ``path`` (JSON lines of this task's record format)."""
        if self.name == "relevance":
            from livethinking.tasks.relevance import load_relevance_records

            return load_relevance_records(path, on_error=on_error).items
        from livethinking.data import load_records

        return load_records(path, on_error=on_error).items

    def messages(self, record) -> list[dict[str, str]]:
        """The record's prompt as chat messages (what an OpenAI-compatible teacher gets)."""
        if self.name == "relevance":
            return record.messages(self.system_prompt, output_format=self.output_format,
                                   layout=self.prompt_layout)
        from livethinking.model.prompt import build_messages

        history = [{"role": t.role, "content": t.content} for t in record.history]
        return build_messages(record.product_doc, history, record.question,
                              system_prompt=self.system_prompt)

    def prompt_ids(self, tokenizer, record) -> list[int]:
        """The record's prompt as token ids, through the tokenizer's chat template."""
        if self.name == "relevance":
            from livethinking.model.prompt import encode_chat

            return encode_chat(tokenizer, self.messages(record))
        from livethinking.train.common import prompt_ids

        return prompt_ids(tokenizer, record, self.system_prompt)

    def judges(self, config: JudgeConfig):
        """(correctness, helpfulness) judges. Relevance has rule judges only: the exact
        label (or its distance) and the output format."""
        if self.name == "relevance":
            if config.kind != "rule":
                raise ValueError("task relevance is judged by rule (judge.kind: rule): the "
                                 "label is read from the response and compared")
            from livethinking.rewards import relevance_judges

            return relevance_judges(self.output_format, partial_credit=self.partial_credit)
        from livethinking.train.common import make_judges

        return make_judges(config)


def task_of(config) -> Task:
    """The task a run config names (``task``, ``system_prompt``, ``output_format``,
    ``partial_credit``; absent fields take the livestream defaults)."""
    return Task(getattr(config, "task", "livestream"), getattr(config, "system_prompt", None),
                getattr(config, "output_format", "cot"),
                getattr(config, "partial_credit", False),
                getattr(config, "prompt_layout", "default"))
