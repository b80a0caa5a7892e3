"""Rule judges: exact checks of a response's answer part against its product document.

The answer A is the text after ``</think>`` (`split_response`); the asked attribute a
comes from the question's keywords (`AttributeKeywords`: the livestream domain's rule). A value v "is stated" when it occurs in A as whole
words (case-insensitive, longest values first). A stated v is consistent when v equals
the document's value of some attribute whose vocabulary holds v; otherwise it
contradicts the document (the doc has that attribute) or is made up (it has not).

Correctness (1 or 0):
  a in the doc      A states doc[a], does not refuse, states nothing inconsistent;
  a not in the doc  A refuses (a refusal marker) and states nothing inconsistent
                    (so no value of a);
  a unknown         F1(words(A), words(reference)) >= f1_threshold (0 without a reference).
Helpfulness = the mean of the checks that apply: non_empty; addresses (states doc[a],
or refuses when a is not in the doc, or reference F1 >= f1_threshold when a is
unknown; skipped with neither); concise (|A| <= max_answer_words words); no_markup
(no reasoning tags in A).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

from livethinking.data import LivestreamRecord
from livethinking.rewards.base import Judge, Verdict
from livethinking.tasks.livestream import (ATTRIBUTES, REFUSAL_MARKERS, WEAK_KEYWORDS,
                                           AttributeKeywords, parse_product_doc,
                                           split_response)

__all__ = ["MARKUP", "AnswerFacts", "RuleCorrectnessJudge", "RuleHelpfulnessJudge",
           "Vocabulary", "token_f1"]

MARKUP = ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


_START = r"(?<!\w)(?<!\d\.)"  # a phrase starts a word, and not after "1." ("2 l" in "1.2 l")


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the two texts' lower-cased word multisets (0 if either is empty)."""
    pred, ref = _words(prediction), _words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _phrase_pattern(phrases) -> re.Pattern | None:
    """One regex matching any phrase as whole words, longest first."""
    phrases = sorted({p for p in phrases if p}, key=len, reverse=True)
    if not phrases:
        return None
    return re.compile(_START + "(?:" + "|".join(re.escape(p) for p in phrases) + r")(?!\w)")


class Vocabulary:
    """A catalogue's attribute values, question keywords and refusal markers, compiled
    for matching. Defaults: the demo catalogue's."""

    __slots__ = ("attributes", "owners", "_values", "_keywords", "_refusal")

    def __init__(self, attributes: Mapping[str, Sequence[str]] | None = None,
                 question_keywords: Mapping[str, Sequence[str]] | None = None,
                 refusal_markers: Sequence[str] | None = None,
                 weak_keywords: Sequence[str] = WEAK_KEYWORDS):
        attributes = ATTRIBUTES if attributes is None else attributes
        refusal_markers = REFUSAL_MARKERS if refusal_markers is None else refusal_markers
        if isinstance(refusal_markers, str):
            raise TypeError("refusal_markers must be a sequence of phrases, not one string")
        if not refusal_markers:
            raise ValueError("refusal_markers must not be empty")
        self.attributes = {a: tuple(_norm(v) for v in vs) for a, vs in attributes.items()}
        owners: dict[str, set[str]] = {}
        for attr, values in self.attributes.items():
            for v in values:
                owners.setdefault(v, set()).add(attr)
        self.owners = {v: frozenset(a) for v, a in owners.items()}
        self._values = _phrase_pattern(self.owners)
        self._keywords = AttributeKeywords(question_keywords, weak_keywords)
        self._refusal = tuple(_norm(m) for m in refusal_markers)

    def asked_attribute(self, question: str) -> str | None:
        """The attribute the question asks about (:class:`AttributeKeywords`' rule over
        this vocabulary's keywords); None when no keyword occurs."""
        return self._keywords.asked_attribute(question)

    def stated_values(self, text: str) -> list[str]:
        """Known attribute values occurring in ``text`` as whole words, longest first."""
        return [] if self._values is None else self._values.findall(_norm(text))

    def refuses(self, text: str) -> bool:
        t = _norm(text)
        return any(m in t for m in self._refusal)


def _states(text: str, value: str) -> bool:
    return re.search(_START + re.escape(_norm(value)) + r"(?!\w)", _norm(text)) is not None


class AnswerFacts:
    """What an answer says, checked against its record's product document."""

    __slots__ = ("answer", "asked", "has_asked", "states_doc_value", "refuses", "problems")

    def __init__(self, vocab: Vocabulary, record: LivestreamRecord, answer: str):
        doc = {k: _norm(v) for k, v in parse_product_doc(record.product_doc).items()}
        self.answer = answer
        self.asked = vocab.asked_attribute(record.question)
        self.has_asked = self.asked is not None and self.asked in doc
        stated = vocab.stated_values(answer)
        self.states_doc_value = False
        if self.has_asked:  # a known value must be stated whole ("large" ≠ "extra large")
            value = doc[self.asked]
            self.states_doc_value = (value in stated if value in vocab.owners
                                     else _states(answer, value))
        self.refuses = vocab.refuses(answer)
        self.problems: list[str] = []  # stated values inconsistent with the document
        for v in stated:
            owners = vocab.owners[v]
            if any(doc.get(a) == v for a in owners):
                continue
            known = sorted(a for a in owners if a in doc)
            if known:
                self.problems.append(f"says {v!r} but the document's {known[0]} is "
                                     f"{doc[known[0]]!r}")
            else:
                self.problems.append(f"made up {v!r} ({'/'.join(sorted(owners))} "
                                     "not in the document)")


class RuleCorrectnessJudge(Judge):
    """1.0 when the answer is right by the document (module docstring), else 0.0."""

    def __init__(self, *, attributes=None, question_keywords=None, refusal_markers=None,
                 weak_keywords=WEAK_KEYWORDS, f1_threshold: float = 0.6):
        if not 0.0 <= f1_threshold <= 1.0:
            raise ValueError(f"f1_threshold must be in [0, 1], got {f1_threshold}")
        self.vocab = Vocabulary(attributes, question_keywords, refusal_markers, weak_keywords)
        self.f1_threshold = f1_threshold

    def judge(self, record: LivestreamRecord, response: str) -> Verdict:
        _, answer = split_response(response)
        facts = AnswerFacts(self.vocab, record, answer)
        if facts.asked is None:
            if record.reference is None:
                return Verdict(0.0, "attribute unknown and no reference")
            f1 = token_f1(answer, record.reference)
            ok = f1 >= self.f1_threshold
            return Verdict(float(ok), f"reference F1 {f1:.2f} {'>=' if ok else '<'} "
                                      f"{self.f1_threshold}")
        failed = list(facts.problems)
        if facts.has_asked:
            if not facts.states_doc_value:
                failed.insert(0, f"does not state the document's {facts.asked}")
            if facts.refuses:
                failed.insert(0, f"refuses although the document gives {facts.asked}")
        elif not facts.refuses:
            failed.insert(0, f"does not refuse ({facts.asked} is not in the document)")
        return Verdict(0.0 if failed else 1.0, "; ".join(failed) or "ok")


class RuleHelpfulnessJudge(Judge):
    """Mean of the helpfulness checks that apply (module docstring)."""

    def __init__(self, *, attributes=None, question_keywords=None, refusal_markers=None,
                 weak_keywords=WEAK_KEYWORDS, max_answer_words: int = 30, f1_threshold: float = 0.6,
                 markup: Sequence[str] = MARKUP):
        if max_answer_words < 1:
            raise ValueError(f"max_answer_words must be >= 1, got {max_answer_words}")
        if not 0.0 <= f1_threshold <= 1.0:
            raise ValueError(f"f1_threshold must be in [0, 1], got {f1_threshold}")
        self.vocab = Vocabulary(attributes, question_keywords, refusal_markers, weak_keywords)
        self.max_answer_words = max_answer_words
        self.f1_threshold = f1_threshold
        self.markup = tuple(m.lower() for m in markup)

    def judge(self, record: LivestreamRecord, response: str) -> Verdict:
        _, answer = split_response(response)
        facts = AnswerFacts(self.vocab, record, answer)
        checks = {"non_empty": bool(answer.strip())}
        if facts.has_asked:
            checks["addresses"] = facts.states_doc_value
        elif facts.asked is not None:
            checks["addresses"] = facts.refuses
        elif record.reference is not None:
            checks["addresses"] = token_f1(answer, record.reference) >= self.f1_threshold
        n_words = len(answer.split())
        checks["concise"] = n_words <= self.max_answer_words
        lowered = answer.lower()
        checks["no_markup"] = not any(m in lowered for m in self.markup)
        failed = [name for name, ok in checks.items() if not ok]
        if "concise" in failed:
            failed[failed.index("concise")] = f"concise ({n_words} > {self.max_answer_words} words)"
        return Verdict(sum(checks.values()) / len(checks), "failed: " + ", ".join(failed)
                       if failed else "ok")
