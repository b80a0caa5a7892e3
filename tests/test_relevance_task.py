"""The relevance task (livethinking.tasks.relevance): records and their loading, the two
response formats, the synthetic set (its tier rule re-derived here from the documents),
the teacher, the judges, cumulative-probability tiering and its metrics."""

import json
import math
import re
from collections import Counter

import pytest
import torch

from livethinking.data import DataError, write_jsonl
from livethinking.rewards import (Judge, LivestreamReward, RelevanceFormatJudge,
                                  RelevanceLabelJudge, Verdict, relevance_judges)
from livethinking.tasks.livestream import ATTRIBUTES
from livethinking.tasks.livestream.demo_data import CATEGORIES
from livethinking.tasks.relevance.prompt import LABEL_FIRST_PROMPT, PROMPT_LAYOUTS
from livethinking.tasks.relevance import (CUMPT_TOLERANCE, LABEL_TEXTS, OUTPUT_FORMATS, TIERS,
                                          ParsedResponse, RelevanceRecord, accuracy, calibrate_tau, cumpt,
                                          format_response, label_distribution,
                                          label_token_ids, load_relevance_records, macro_f1,
                                          make_relevance_demo, messages, parse_label,
                                          parse_response, relevance_teacher,
                                          write_relevance_records)

LABELS = {k: f"{k}-{name}" for k, name in TIERS.items()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = make_relevance_demo(tmp_path_factory.mktemp("relevance"), seed=5)
    splits = {name: load_relevance_records(getattr(paths, name)).items
              for name in ("train", "dev", "heldout")}
    return paths, splits


def _record(label=4, **kw):
    fields = dict(id="r0", query="red kettle", label=label,
                  product_doc="# Product: Nimbus Kettle\ncategory: kettle\ncolor: red")
    fields.update(kw)
    return RelevanceRecord(**fields)


# --- records ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 5, -1, "4", 4.0, True, None])
def test_record_rejects_a_label_outside_1_to_4(bad):
    with pytest.raises(ValueError, match="label"):
        _record(label=bad)


@pytest.mark.parametrize("field", ["id", "query", "product_doc"])
def test_record_rejects_empty_text(field):
    with pytest.raises(ValueError, match=field):
        _record(**{field: "  "})


def test_records_round_trip_through_jsonl(tmp_path):
    records = [_record(), _record(id="r1", label=2, reference_reasoning="because")]
    write_relevance_records(tmp_path / "a.jsonl", records)
    write_jsonl(tmp_path / "b.jsonl", [r.to_json() for r in records])  # the generic writer
    for name in ("a.jsonl", "b.jsonl"):
        assert load_relevance_records(tmp_path / name).items == records
    assert "reference_reasoning" not in records[0].to_json()


BAD_LINES = [
    ({"label": 0}, "'label' must be an int in 1..4"),
    ({"label": "3"}, "'label' must be an int in 1..4"),
    ({"label": True}, "'label' must be an int in 1..4"),
    ({"label": 2.5}, "'label' must be an int in 1..4"),
    ({"query": " "}, "'query' must be a non-empty string"),
    ({"query": 7}, "'query' must be a string"),
    ({"product_doc": ""}, "'product_doc' must be a non-empty string"),
    ({"reference_reasoning": 3}, "'reference_reasoning' must be a string or null"),
    ({"extra": 1}, "unknown key 'extra'"),
]


@pytest.mark.parametrize("change,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_loader_names_the_file_line_and_field(tmp_path, change, message):
    good = _record().to_json()
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**good, "id": "ok"}) + "\n\n"
                    + json.dumps({**good, **change}) + "\n")
    with pytest.raises(DataError) as info:
        load_relevance_records(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)
    result = load_relevance_records(path, on_error="skip")
    assert [r.id for r in result.items] == ["ok"]
    assert result.skipped[0][0] == 3 and message in result.skipped[0][1]


def test_loader_rejects_missing_keys_and_duplicate_ids(tmp_path):
    good = _record().to_json()
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n"
                    + json.dumps({k: v for k, v in good.items() if k != "label"}) + "\n")
    with pytest.raises(DataError, match=r":2: duplicate id 'r0' \(first on line 1\)"):
        load_relevance_records(path)
    result = load_relevance_records(path, on_error="skip")
    assert len(result.items) == 1
    assert [(n, "label" in why) for n, why in result.skipped] == [(2, False), (3, True)]
    with pytest.raises(ValueError, match="on_error"):
        load_relevance_records(path, on_error="ignore")


# --- response formats ---------------------------------------------------------------------

@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("label", sorted(TIERS))
def test_formats_round_trip(output_format, label):
    response = format_response(label, "  The product is a kettle.  ", output_format)
    assert parse_label(response, output_format) == label
    assert parse_response(response, output_format).reasoning == "The product is a kettle."
    if output_format == "post_cot":
        assert response.startswith(LABEL_TEXTS[label] + "-")  # the digit comes first
        assert response == f"{LABELS[label]}\n<think>The product is a kettle.</think>"
    else:
        assert response == f"<think>The product is a kettle.</think>\n{LABELS[label]}"


MALFORMED = [
    ("cot", "<think>r</think>"),                      # label missing
    ("cot", "<think>r</think>\n4"),                   # digit only
    ("cot", "<think>r</think>\nExcellent"),           # tier name only
    ("cot", "<think>r</think>\n3-Excellent"),         # digit and name disagree
    ("cot", "<think>r</think>\n4-Excellent, surely"),  # extra text
    ("cot", "<think>r</think>\n4-excellent"),         # case matters
    ("cot", "4-Excellent"),                           # no think block: no place for it
    ("cot", "<think>r 4-Excellent"),                  # unclosed think
    ("post_cot", "<think>r</think>\n4-Excellent"),    # label not first
    ("post_cot", " 4-Excellent\n<think>r</think>"),   # not even after a space
    ("post_cot", "\n4-Excellent\n<think>r</think>"),
    ("post_cot", "4-Excellent product\n<think>r</think>"),  # extra text on its line
    ("post_cot", "4-Excellent <think>r</think>"),     # its line is the label alone
    ("post_cot", "5-Excellent\n<think>r</think>"),
    ("post_cot", "4-Mismatch\n<think>r</think>"),
    ("post_cot", "Excellent\n<think>r</think>"),
    ("post_cot", ""),
]


@pytest.mark.parametrize("output_format,response", MALFORMED)
def test_malformed_labels_parse_to_none(output_format, response):
    assert parse_label(response, output_format) is None


def test_the_reasoning_must_sit_in_its_place():
    assert parse_response("4-Excellent", "post_cot") == ParsedResponse(label=4, reasoning=None)
    assert parse_response("4-Excellent\n<think>r</think> and more", "post_cot").reasoning is None
    assert parse_response("4-Excellent\n<think>r</think>\n", "post_cot").reasoning == "r"
    assert parse_response("4-Excellent\n<think>r</think>\n", "cot").label is None  # other format
    cot = parse_response("r</think>\n2-Mismatch", "cot")  # the opening tag sat in the prompt
    assert (cot.label, cot.reasoning) == (2, "r")
    assert parse_response("  <think>r</think>  2-Mismatch\n", "cot").label == 2


def test_format_response_checks_its_arguments():
    with pytest.raises(ValueError, match="label"):
        format_response(0, "r", "cot")
    with pytest.raises(ValueError, match="output_format"):
        format_response(4, "r", "pre_cot")
    with pytest.raises(ValueError, match="think"):
        format_response(4, "a</think>b", "cot")
    with pytest.raises(ValueError, match="output_format"):
        parse_label("4-Excellent", "post-cot")


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_messages_hold_tiers_format_document_and_query(output_format):
    record = _record()
    got = record.messages(output_format=output_format)
    assert got == messages(record, output_format=output_format)
    assert [m["role"] for m in got] == ["system", "user"] and got[1]["content"] == "red kettle"
    system = got[0]["content"]
    assert all(LABELS[k] in system for k in TIERS)
    assert system.endswith("# Product document\n" + record.product_doc)
    example = "<think>reasoning</think>\n4-Excellent" if output_format == "cot" \
        else "4-Excellent\n<think>reasoning</think>"
    assert example in system
    custom = record.messages("Grade it.", output_format=output_format)[0]["content"]
    assert custom.startswith("Grade it.\n\n") and example in custom
    with pytest.raises(ValueError, match="output_format"):
        record.messages(output_format="json")


def test_label_first_layout_puts_the_query_around_the_document():
    record = _record(product_doc="# Product: Nimbus Kettle\ncategory: kettle\ncolor: red")
    system, user = record.messages(output_format="post_cot", layout="query_doc_query")
    assert system == {"role": "system", "content": LABEL_FIRST_PROMPT}
    assert user["content"] == ("Query: red kettle\n\n# Product document\ncategory: kettle\n"
                               "color: red\n\nQuery: red kettle")
    assert "Nimbus" not in user["content"]  # the name line is dropped
    assert all(LABELS[k] not in system["content"] for k in TIERS)  # no tier definitions
    assert record.messages("Grade it.", layout="query_doc_query")[0]["content"] == "Grade it."
    with pytest.raises(ValueError, match="layout must be one of"):
        record.messages(layout="doc_only")
    with pytest.raises(ValueError, match="output_format"):
        record.messages(output_format="json", layout="query_doc_query")
    assert PROMPT_LAYOUTS == ("default", "query_doc_query")


# --- the synthetic set --------------------------------------------------------------------

def _doc_fields(doc):
    """The document's ``key: value`` lines (read here, not with the package's parser)."""
    fields = {}
    for line in doc.split("\n")[1:]:
        key, value = line.split(": ", 1)
        fields[key] = value
    return fields


_SUFFIX = {"warranty": " warranty", "battery": " battery", "shipping": " shipping"}


def _read_query(query):
    """(category, {attribute: value}) of a demo query: each vocabulary phrase is cut out of
    the query, longest first; everything must be accounted for."""
    rest, found = f" {query} ", {}
    phrases = sorted(((v + _SUFFIX.get(a, ""), a, v) for a, vs in ATTRIBUTES.items() for v in vs),
                     key=lambda t: -len(t[0]))
    for phrase, attr, value in phrases:
        if f" {phrase} " in rest:
            found[attr] = value
            rest = rest.replace(f" {phrase} ", " ", 1)
    categories = [w for w in rest.split() if w in CATEGORIES]
    assert len(categories) == 1 and rest.split() == categories, (query, rest)
    return categories[0], found


def _expected_tier(query, doc):
    category, wanted = _read_query(query)
    fields = _doc_fields(doc)
    if fields["category"] != category:
        return 1
    if any(a in fields and fields[a] != v for a, v in wanted.items()):
        return 2
    if any(a not in fields for a in wanted):
        return 3
    return 4


def test_every_label_follows_the_tier_rule(demo):
    _, splits = demo
    for records in splits.values():
        for r in records:
            category, wanted = _read_query(r.query)
            assert 1 <= len(wanted) <= 2, r.query
            assert r.label == _expected_tier(r.query, r.product_doc), r


def test_tiers_are_balanced_in_every_split(demo):
    paths, splits = demo
    assert (paths.num_train, paths.num_dev, paths.num_heldout) == tuple(
        len(splits[s]) for s in ("train", "dev", "heldout"))
    for name, records in splits.items():
        counts = Counter(r.label for r in records)
        assert set(counts) == set(TIERS), name
        for k in TIERS:  # 8 queries a product: exactly a quarter each
            assert counts[k] == len(records) // 4, (name, counts)
    # a product gets both the hard near-misses and the easy cases
    one_attr = sum(len(_read_query(r.query)[1]) == 1 for r in splits["train"])
    assert 0.3 < one_attr / len(splits["train"]) < 0.7


def test_splits_are_disjoint_by_product(demo):
    paths, splits = demo
    catalogue = json.loads(paths.catalogue.read_text())["products"]
    split_of_doc = {}
    for p in catalogue:
        doc = "\n".join([f"# Product: {p['name']}", f"category: {p['category']}",
                         *(f"{k}: {v}" for k, v in p["attributes"].items())])
        split_of_doc[doc] = p["split"]
    assert len(split_of_doc) == len(catalogue) == paths.num_products
    for name, records in splits.items():
        assert {split_of_doc[r.product_doc] for r in records} == {name}
    assert Counter(p["split"] for p in catalogue) == {"train": 33, "dev": 5, "heldout": 10}
    corpus_lines = set(paths.corpus.read_text().splitlines())
    for p in catalogue:
        assert (f"# Product: {p['name']}" in corpus_lines) == (p["split"] == "train")
    ids = [r.id for records in splits.values() for r in records]
    assert len(ids) == len(set(ids))


def test_reference_reasoning_is_a_chain_of_lookups(demo):
    _, splits = demo
    for r in splits["train"]:
        fields = _doc_fields(r.product_doc)
        steps = re.split(r"(?<=\.) ", r.reference_reasoning)
        assert steps[-1] == f"So {LABELS[r.label]}."
        assert f"category is {fields['category']}" in steps[1]
        for step in steps[2:-1]:
            m = re.fullmatch(r"Its (\w+) is (.+?)(, not .+)?: (matches|mismatch|cannot confirm)\.",
                             step)
            assert m, step
            attr, value = m.group(1), m.group(2)
            assert value == fields.get(attr, "not listed"), (step, fields)
        assert len(r.reference_reasoning.split()) <= 60


def test_the_maker_is_deterministic(tmp_path, demo):
    paths, _ = demo
    again = make_relevance_demo(tmp_path / "a", seed=5)
    other = make_relevance_demo(tmp_path / "b", seed=6)
    for name in ("train", "dev", "heldout", "catalogue", "corpus"):
        assert getattr(again, name).read_bytes() == getattr(paths, name).read_bytes()
    assert other.train.read_bytes() != paths.train.read_bytes()


def test_label_products_add_their_own_split_and_change_nothing_else(tmp_path, demo):
    paths, splits = demo
    more = make_relevance_demo(tmp_path / "l", seed=5, label_products=6)
    assert paths.label_train is None and paths.num_label_train == 0
    for name in ("train", "dev", "heldout", "catalogue", "corpus"):
        assert getattr(more, name).read_bytes() == getattr(paths, name).read_bytes()
    extra = load_relevance_records(more.label_train).items
    assert len(extra) == more.num_label_train == 6 * 8
    products = {r.id.split("-")[0] if "-" in r.id else r.id for r in extra}
    assert products and all(r.product_doc not in {s.product_doc for s in splits["heldout"]}
                            for r in extra)
    for r in extra:
        assert r.label == _expected_tier(r.query, r.product_doc)
        assert r.reference_reasoning
    assert Counter(r.label for r in extra) == Counter({k: 12 for k in TIERS})
    with pytest.raises(ValueError, match="label_products"):
        make_relevance_demo(tmp_path / "bad", label_products=-1)


def test_the_maker_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="no training product"):
        make_relevance_demo(tmp_path, num_products=2)
    with pytest.raises(ValueError, match="dev_fraction"):
        make_relevance_demo(tmp_path, dev_fraction=1.0)
    with pytest.raises(ValueError, match="queries_per_product"):
        make_relevance_demo(tmp_path, queries_per_product=0)
    small = make_relevance_demo(tmp_path / "s", num_products=3, queries_per_product=3,
                                heldout_fraction=0.0, dev_fraction=0.0)
    assert (small.num_train, small.num_dev, small.num_heldout) == (9, 0, 0)
    assert small.dev.read_text() == ""


# --- the teacher --------------------------------------------------------------------------

def _conclusion(reasoning):
    return int(re.search(r"So ([1-4])-\w+\.$", reasoning).group(1))


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_teacher_errs_at_its_rate_in_both_ways(demo, output_format):
    _, splits = demo
    records = splits["train"]
    out = relevance_teacher(records, k=8, seed=1, output_format=output_format)
    assert set(out) == {r.id for r in records} and all(len(v) == 8 for v in out.values())
    kinds = Counter()
    for r in records:
        for response in out[r.id]:
            parsed = parse_response(response, output_format)
            assert parsed.label is not None and parsed.reasoning
            if parsed.label == r.label:
                kinds["correct"] += 1
                assert _conclusion(parsed.reasoning) == r.label
            elif _conclusion(parsed.reasoning) == r.label:
                kinds["hallucination"] += 1  # sound reasoning, wrong label
            else:
                kinds["wrong step"] += 1
                assert _conclusion(parsed.reasoning) == parsed.label
    total = sum(kinds.values())
    assert abs(1 - kinds["correct"] / total - 0.25) < 0.04, kinds
    assert abs(kinds["hallucination"] / total - 0.125) < 0.04, kinds
    assert abs(kinds["wrong step"] / total - 0.125) < 0.04, kinds


def test_teacher_is_deterministic_and_bounded(demo):
    _, splits = demo
    records = splits["dev"]
    a = relevance_teacher(records, k=4, seed=2)
    assert a == relevance_teacher(records, k=4, seed=2)
    assert a != relevance_teacher(records, k=4, seed=3)
    two = relevance_teacher(records, k=2, seed=2)
    assert all(two[i] == a[i][:2] for i in a)
    post = relevance_teacher(records, k=4, seed=2, output_format="post_cot")
    assert all([parse_response(s, "post_cot") for s in post[i]]
               == [parse_response(s, "cot") for s in a[i]] for i in a)  # same draws
    perfect = relevance_teacher(records, k=3, seed=2, error_rate=0.0)
    always = relevance_teacher(records, k=3, seed=2, error_rate=1.0)
    for r in records:
        assert all(parse_label(s, "cot") == r.label for s in perfect[r.id])
        assert all(parse_label(s, "cot") != r.label for s in always[r.id])
    with pytest.raises(ValueError, match="error_rate"):
        relevance_teacher(records, k=1, seed=0, error_rate=1.5)
    with pytest.raises(ValueError, match="k must be"):
        relevance_teacher(records, k=0, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        relevance_teacher([records[0], records[0]], k=1, seed=0)


# --- the judges ---------------------------------------------------------------------------

@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_label_judge_with_and_without_partial_credit(output_format):
    record = _record(label=4)
    strict = RelevanceLabelJudge(output_format)
    partial = RelevanceLabelJudge(output_format, partial_credit=True)
    for pred, credit in ((4, 1.0), (3, 2 / 3), (2, 1 / 3), (1, 0.0)):
        response = format_response(pred, "r", output_format)
        assert strict.judge(record, response).score == (1.0 if pred == 4 else 0.0)
        assert math.isclose(partial.judge(record, response).score, credit)
    other = "post_cot" if output_format == "cot" else "cot"
    misplaced = format_response(4, "r", other)
    assert strict.judge(record, misplaced).score == partial.judge(record, misplaced).score == 0.0
    assert "no" in partial.judge(record, "").reason
    assert math.isclose(partial.judge(_record(label=2), format_response(4, "r", output_format))
                        .score, 1 / 3)


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_format_judge_is_the_mean_of_its_checks(output_format):
    judge = RelevanceFormatJudge(output_format, max_reasoning_words=5)
    record = _record()
    assert judge.judge(record, format_response(2, "one two three", output_format)).score == 1.0
    long = judge.judge(record, format_response(2, "one two three four five six", output_format))
    assert math.isclose(long.score, 2 / 3) and "concise" in long.reason
    empty = judge.judge(record, format_response(2, "", output_format))
    assert math.isclose(empty.score, 2 / 3) and "reasoning" in empty.reason
    label_only = "<think></think>\n3-Related" if output_format == "cot" else "3-Related"
    assert math.isclose(judge.judge(record, label_only).score, 2 / 3)
    other = "post_cot" if output_format == "cot" else "cot"
    assert judge.judge(record, format_response(2, "x", other)).score <= 2 / 3
    assert math.isclose(judge.judge(record, "no idea").score, 1 / 3)  # only "concise" holds
    with pytest.raises(ValueError, match="max_reasoning_words"):
        RelevanceFormatJudge(output_format, max_reasoning_words=0)


def test_judges_follow_the_judge_protocol_and_feed_the_reward():
    correctness, helpfulness = relevance_judges("post_cot", partial_credit=True)
    assert isinstance(correctness, Judge) and isinstance(helpfulness, Judge)
    assert (correctness.output_format, correctness.partial_credit) == ("post_cot", True)
    assert helpfulness.output_format == "post_cot"
    records = [_record(label=4), _record(id="r1", label=1)]
    responses = [format_response(4, "ok", "post_cot"), format_response(2, "ok", "post_cot")]
    verdicts = correctness.judge_many(records, responses)
    assert [v.score for v in verdicts] == [1.0, pytest.approx(2 / 3)]
    assert all(isinstance(v, Verdict) for v in verdicts)
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        correctness.judge_many(records, responses[:1])
    reward = LivestreamReward(correctness, helpfulness)  # the generic total takes them
    totals = reward.score_many(records, responses, [5, 5])
    assert totals[0].total == pytest.approx(1.0 + 0.5 * 1.0)
    with pytest.raises(ValueError, match="output_format"):
        RelevanceLabelJudge("text")


# --- cumulative-probability tiering -------------------------------------------------------

def _cumpt_reference(row, tau):
    """Highest tier k with p_k + ... + p_4 >= tau, one row at a time, in Python floats."""
    total = sum(row)
    for k in (4, 3, 2, 1):
        if sum(row[k - 1:]) / total >= tau - CUMPT_TOLERANCE:
            return k
    return 1


def _random_probs(generator, shape):
    weights = torch.rand(*shape, 4, generator=generator, dtype=torch.float64)
    zeros = torch.rand(*shape, 4, generator=generator) < 0.3  # some tiers hold no mass
    weights = weights.masked_fill(zeros, 0.0)
    weights[..., 0] += (weights.sum(-1) == 0).double()  # no all-zero row
    return (weights / weights.sum(-1, keepdim=True)).float()


def test_cumpt_matches_a_reference_on_random_distributions(generator):
    probs = _random_probs(generator, (3, 7))
    taus = [0.0, 1.0, *torch.rand(6, generator=generator).tolist()]
    for tau in taus:
        got = cumpt(probs, tau)
        assert got.dtype == torch.int64 and got.shape == (3, 7)
        want = [[_cumpt_reference(row, tau) for row in plane] for plane in probs.double().tolist()]
        assert got.tolist() == want, tau


def test_cumpt_edges(generator):
    probs = _random_probs(generator, (50,))
    assert cumpt(probs, 0.0).eq(4).all()  # tau = 0: the top tier always
    lowest_with_mass = (probs > 0).double().argmax(-1) + 1  # tau = 1: all the mass above
    assert torch.equal(cumpt(probs, 1.0), lowest_with_mass)
    assert torch.equal(cumpt(probs * 7.0, 0.4), cumpt(probs, 0.4))  # normalised here
    for k in TIERS:
        onehot = torch.nn.functional.one_hot(torch.tensor(k - 1), 4).float()
        for tau in (1e-6, 0.3, 0.5, 1.0):
            assert cumpt(onehot, tau).item() == k and cumpt(onehot, tau).shape == ()
        assert cumpt(onehot, 0.0).item() == 4
    # the median reading: tau = 0.5 on a symmetric spread picks the upper middle
    assert cumpt(torch.tensor([0.25, 0.25, 0.25, 0.25]), 0.5).item() == 3
    assert cumpt(torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.41).item() == 3
    assert cumpt(torch.zeros(0, 2, 4), 0.5).shape == (0, 2)


@pytest.mark.parametrize("tau", [-0.01, 1.01, float("nan"), True, "0.5", None])
def test_cumpt_rejects_a_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        cumpt(torch.full((2, 4), 0.25), tau)


@pytest.mark.parametrize("probs,error", [
    (torch.full((3,), 1 / 3), ValueError), (torch.full((2, 5), 0.2), ValueError),
    (torch.tensor([0.5, 0.5, -0.1, 0.1]), ValueError),
    (torch.tensor([0.5, float("nan"), 0.0, 0.5]), ValueError),
    (torch.zeros(2, 4), ValueError), (torch.ones(2, 4, dtype=torch.int64), TypeError),
    ([0.25] * 4, TypeError)])
def test_cumpt_rejects_bad_probabilities(probs, error):
    with pytest.raises(error):
        cumpt(probs, 0.5)


def test_calibrate_tau_maximises_macro_f1():
    # rows [0, 0, 1 - a, a]: cumpt says 4 iff a >= tau, else 3; gold says 4 iff a >= 0.7
    a = torch.tensor([0.1, 0.3, 0.5, 0.655, 0.745, 0.9, 0.95])  # no grid point on a row
    probs = torch.stack([torch.zeros_like(a), torch.zeros_like(a), 1 - a, a], dim=-1)
    gold = torch.where(a >= 0.7, 4, 3)
    tau, f1 = calibrate_tau(probs, gold)
    assert f1 == 1.0 and tau == 0.66  # 0.66 ... 0.74 all score 1: the closest to 0.5 wins
    grid = [i / 100 for i in range(101)]
    assert f1 == max(macro_f1(cumpt(probs, t), gold) for t in grid)
    assert calibrate_tau(probs, gold, grid=[0.2, 0.8, 0.7]) == (0.7, 1.0)
    tau, f1 = calibrate_tau(probs, gold, grid=[0.2, 0.6])
    assert tau == 0.6 and f1 == pytest.approx(macro_f1(cumpt(probs, 0.6), gold))
    # a tie everywhere: every tau gives the same tiers, so 0.5's neighbour wins
    flat = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 3)
    assert calibrate_tau(flat, [4, 4, 3], grid=[0.0, 0.45, 0.9])[0] == 0.45
    with pytest.raises(ValueError, match="3 distributions but 2 labels"):
        calibrate_tau(flat, [4, 4])
    with pytest.raises(ValueError, match="grid is empty"):
        calibrate_tau(flat, [4, 4, 3], grid=[])


def test_macro_f1_and_accuracy_by_hand():
    pred, gold = [4, 4, 4, 2, 1], [4, 3, 4, 2, 2]
    # class 4: tp 2 fp 1 fn 0 -> 4/5; class 3: fn 1 -> 0; class 2: tp 1 fn 1 -> 2/3;
    # class 1: fp 1 -> 0
    assert macro_f1(pred, gold) == pytest.approx((4 / 5 + 0 + 2 / 3 + 0) / 4)
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    # classes 1 and 3 appear in neither: excluded, not scored
    assert macro_f1(torch.tensor([4, 4, 2]), torch.tensor([4, 2, 2])) == pytest.approx(2 / 3)
    assert macro_f1([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        macro_f1([1, 2], [1])
    # pred 0 is no label: a false negative of its gold class, nobody's false positive
    assert macro_f1([0, 2, 2], [1, 2, 2]) == pytest.approx((0 + 1) / 2)
    assert accuracy([0, 2], [1, 2]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0..4"):
        macro_f1([-1, 2], [1, 2])
    with pytest.raises(ValueError, match="gold must hold classes 1..4"):
        macro_f1([1, 2], [0, 2])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(TypeError, match="integers"):
        macro_f1(torch.tensor([1.0]), torch.tensor([1.0]))


# --- the label token ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(demo, tmp_path_factory):
    from livethinking.train.demo import build_tokenizer

    paths, _ = demo
    return build_tokenizer(paths.corpus, tmp_path_factory.mktemp("tokenizer"))


def test_label_token_ids_are_the_first_response_token(tokenizer, demo):
    from livethinking.model.prompt import encode_chat

    _, splits = demo
    ids = label_token_ids(tokenizer)
    assert ids == [tokenizer.convert_tokens_to_ids(str(k)) for k in (1, 2, 3, 4)]
    for r in splits["heldout"][:4]:
        prompt = encode_chat(tokenizer, r.messages(output_format="post_cot"))
        response = tokenizer.encode(format_response(r.label, r.reference_reasoning, "post_cot"),
                                    add_special_tokens=False)
        assert response[0] == ids[r.label - 1]
        assert tokenizer.decode(prompt + response).endswith(r.reference_reasoning + "</think>")


class _FakeTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def encode(self, text, add_special_tokens=False):
        return self.pieces(text)


def test_label_token_ids_refuse_a_tokenizer_that_merges_the_label(tokenizer):
    with pytest.raises(ValueError, match="not a single token"):
        label_token_ids(_FakeTokenizer(lambda text: [1, 2] if text == "3" else [int(text[0])]))
    with pytest.raises(ValueError, match="does not start"):  # "4-" merged into one token
        label_token_ids(_FakeTokenizer(lambda text: [int(text[0])] if len(text) == 1
                                       else [10 + int(text[0]), 0]))
    with pytest.raises(ValueError, match="not distinct"):
        label_token_ids(_FakeTokenizer(lambda text: [7]))


def test_label_distribution_is_a_softmax_over_the_label_logits(generator):
    logits = torch.randn(2, 3, 50, generator=generator)
    ids = [11, 3, 40, 7]
    probs = label_distribution(logits, ids)
    assert probs.shape == (2, 3, 4) and probs.dtype == torch.float32
    want = torch.softmax(logits[..., ids].double(), -1)
    torch.testing.assert_close(probs.double(), want, rtol=1e-6, atol=1e-7)
    assert cumpt(probs, 0.5).shape == (2, 3)
    big = logits.clone()
    big[..., 0] = 100.0  # mass on another token is dropped, not spread
    torch.testing.assert_close(label_distribution(big, ids), probs)
    with pytest.raises(ValueError, match="4 token ids"):
        label_distribution(logits, ids[:3])
    with pytest.raises(ValueError, match="out of range"):
        label_distribution(logits, [1, 2, 3, 50])
