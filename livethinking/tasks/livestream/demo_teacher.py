"""The demo's programmatic teacher: verbose ``<think>`` reasoning and a short answer, wrong
at a set rate, reproducible per (seed, record)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from livethinking.data import LivestreamRecord
from livethinking.tasks.livestream.demo_data import (FILLERS, NOT_LISTED, OPENERS,
                                                     answer_sentence, refusal_sentence)
from livethinking.tasks.livestream.domain import ATTRIBUTES, asked_attribute, parse_product_doc

__all__ = ["DemoTeacher"]


@dataclass(kw_only=True, slots=True)
class DemoTeacher:
    """A programmatic teacher: ``respond(record, k)`` gives k ``"<think>R</think> A"``
    responses with verbose reasoning of varying length and a short answer. R restates the
    question, looks the asked attribute up as a catalogue line (``Looking it up: "key:
    value".``, the value ``not listed`` when it decides to refuse), states the conclusion,
    then adds ``min_filler``..``max_filler`` sentences of chatter: the part GRPO learns to
    drop (the lookup stays next to the question it answers). Each is wrong
    with probability ``error_rate`` (another value, a made-up value for a refusal
    question, or a refusal of an answerable one). Responses for a record depend only on
    (seed, record.id): ``respond(r, 2)`` is a prefix of ``respond(r, 4)``."""

    seed: int
    error_rate: float = 0.25
    min_filler: int = 1
    max_filler: int = 6

    def __post_init__(self):
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")
        if not 0 <= self.min_filler <= self.max_filler:
            raise ValueError(f"need 0 <= min_filler <= max_filler, got "
                             f"min_filler={self.min_filler}, max_filler={self.max_filler}")

    def respond(self, record: LivestreamRecord, k: int) -> list[str]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rng = random.Random(f"{self.seed}\x00{record.id}")
        return [self._one(rng, record) for _ in range(k)]

    def _one(self, rng: random.Random, record: LivestreamRecord) -> str:
        doc = parse_product_doc(record.product_doc)
        name = doc.get("name", "product")
        attr = asked_attribute(record.question)
        true_value = doc.get(attr) if attr else None
        wrong = rng.random() < self.error_rate
        attr_name = attr or "detail"
        if true_value is not None and not wrong:
            value = true_value
        elif true_value is not None and rng.random() < 2 / 3:  # another value
            value = rng.choice([v for v in ATTRIBUTES[attr] if v != true_value])
        elif true_value is None and wrong and attr is not None:  # a made-up value
            value = rng.choice(ATTRIBUTES[attr])
        else:  # a refusal: right when the document is silent, wrong otherwise
            value = None

        steps = [f"The viewer asks: \"{record.question}\""]
        user_turns = [t.content for t in record.history if t.role == "user"]
        if user_turns and rng.random() < 0.5:
            steps.append(f"Earlier the viewer asked: \"{user_turns[-1]}\"")
        steps.append("Let me check the product document.")
        # the lookup is a catalogue line, so what follows the key decides the answer
        looked_up = NOT_LISTED if value is None else value
        steps.append(f"Looking it up: \"{attr_name}: {looked_up}\".")
        if value is not None:
            steps.append(f"So the answer is {value}.")
            answer = rng.choice(OPENERS) + answer_sentence(attr, value)
        else:
            steps.append("So I should say that the document does not list it.")
            answer = refusal_sentence(rng, attr_name, name)
        others = [a for a in doc if a not in ("name", "category", attr)] or ["price"]
        fillers = rng.sample(FILLERS, rng.randint(self.min_filler, self.max_filler))
        steps += [f.format(name=name, category=doc.get("category", "product"),
                           attr=attr_name, other=rng.choice(others)) for f in fillers]
        return f"<think>{' '.join(steps)}</think> {answer}"
