"""The livestream task (livethinking.tasks.livestream): its domain rules, the synthetic demo
set and the demo teacher."""

import json
import math

import pytest

from livethinking.cli import main as cli_main
from livethinking.data import load_records, load_texts
from livethinking.tasks.livestream import (ATTRIBUTES, QUESTION_KEYWORDS, REFUSAL_MARKERS,
                                           AttributeKeywords, DemoTeacher, Product,
                                           asked_attribute, format_product_doc, make_demo,
                                           parse_product_doc, split_response)
from livethinking.tasks.livestream.demo_data import NAME_PREFIXES, QUESTION_TEMPLATES


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = make_demo(out, seed=3)
    return paths, load_records(paths.train).items, load_records(paths.heldout).items



# --- the domain rules --------------------------------------------------------------------

def test_keywords_rule_earliest_then_longest_weak_last():
    keywords = AttributeKeywords({"flavor": ("taste", "flavour"), "price": ("how much", "cost"),
                                  "size": ("how big", "big")}, weak_keywords=("how much",))
    assert keywords.asked_attribute("How much does it COST?") == "price"  # case-insensitive
    assert keywords.asked_attribute("How big is it, and how does it taste?") == "size"  # earliest
    assert keywords.asked_attribute("how much flavour is in it?") == "flavor"  # weak counts last
    assert keywords.asked_attribute("How much?") == "price"  # ... but counts alone
    assert keywords.asked_attribute("is it a distaste?") is None  # keywords start a word
    assert keywords.asked_attribute("") is None
    assert AttributeKeywords().asked_attribute("How much does it weigh?") == "weight"
    with pytest.raises(TypeError, match="weak_keywords"):
        AttributeKeywords(weak_keywords="how much")


def test_the_judges_use_the_domain_rule():
    from livethinking.rewards import Vocabulary

    custom = {"flavor": ("taste",), "price": ("how much",)}
    vocab = Vocabulary(attributes={"flavor": ("mint",)}, question_keywords=custom,
                       weak_keywords=("how much",))
    for question in ("How much taste?", "How much?", "Hello", "What does it taste like?"):
        assert vocab.asked_attribute(question) == AttributeKeywords(
            custom, ("how much",)).asked_attribute(question)


def test_vocabulary_is_unambiguous():
    for attr, values in ATTRIBUTES.items():
        assert attr in QUESTION_KEYWORDS
        for v in values:
            assert 1 <= len(v.split()) <= 3
        assert len(set(values)) == len(values)
    for attr, templates in QUESTION_TEMPLATES.items():
        for template in templates:
            for prefix in NAME_PREFIXES:
                question = template.format(name=f"{prefix} Headphones")
                assert asked_attribute(question) == attr, question
    assert asked_attribute("how much is it?") == "price"
    assert asked_attribute("How much does it weigh?") == "weight"
    assert asked_attribute("hello there") is None


def test_parse_inverts_format():
    product = Product(id="p", name="Nimbus Kettle", category="kettle",
                      attributes={"color": "red", "price": "29 dollars", "shipping": "3 to 5 days"})
    doc = format_product_doc(product)
    assert doc.splitlines()[:2] == ["# Product: Nimbus Kettle", "category: kettle"]
    assert parse_product_doc(doc) == {"name": "Nimbus Kettle", "category": "kettle",
                                      **product.attributes}
    assert parse_product_doc("free text\nColor:  Blue \n: x\nnote:") == {"color": "Blue"}


def test_make_demo_is_deterministic(tmp_path, demo):
    paths, train, heldout = demo
    again = make_demo(tmp_path / "again", seed=3)
    other = make_demo(tmp_path / "other", seed=4)
    names = ["catalogue.json", "train.jsonl", "heldout.jsonl", "corpus.txt", "pretrain.jsonl",
             "rl.jsonl"]
    for name in names:
        assert (paths.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes()
    assert (paths.train.read_bytes() != other.train.read_bytes())
    assert (paths.num_train, paths.num_heldout) == (len(train), len(heldout))
    assert len(train) + len(heldout) == 24 * 8
    assert sorted(p.name for p in paths.out_dir.iterdir()) == sorted(names)


def test_heldout_products_are_unseen(demo):
    paths, train, heldout = demo
    catalogue = json.loads(paths.catalogue.read_text())["products"]
    assert sum(p["split"] == "heldout" for p in catalogue) == round(24 * 0.2)
    docs = lambda records: {r.product_doc for r in records}  # noqa: E731
    assert heldout and not docs(train) & docs(heldout)
    split_of = {p["id"]: p["split"] for p in catalogue}
    assert {split_of[r.id.split("-")[0]] for r in heldout} == {"heldout"}
    with pytest.raises(ValueError, match="heldout_fraction"):
        make_demo(paths.out_dir / "x", num_products=1, heldout_fraction=0.5)


def _catalogue_texts(paths):
    texts = load_texts(paths.pretrain).items
    catalogue = json.loads(paths.catalogue.read_text())["products"]
    by_doc = {format_product_doc(Product(id=p["id"], name=p["name"], category=p["category"],
                                         attributes=p["attributes"])): p for p in catalogue}
    return texts, catalogue, by_doc


def test_pretraining_texts_hold_training_products_only(demo, tmp_path):
    paths, train, heldout = demo
    texts, catalogue, by_doc = _catalogue_texts(paths)
    docs = [text.split("\n\n")[0] for text in texts]
    assert sorted(by_doc[d]["id"] for d in docs) == sorted(
        p["id"] for p in catalogue if p["split"] == "train")  # each training product once
    assert not set(docs) & {r.product_doc for r in heldout}
    in_order = 0
    for doc, text in zip(docs, texts):
        lines = text.split("\n\n")[1].split("\n")  # the document's key: value lines again
        absent = [line for line in lines if line.endswith(": not listed")]
        listed = [line for line in lines if line not in absent]
        assert sorted(listed) == sorted(doc.split("\n")[2:])
        assert 1 <= len(absent) <= 2 and len(set(absent)) == len(absent)
        assert all(key.split(": ")[0] in ATTRIBUTES and key.split(": ")[0] not in
                   parse_product_doc(doc) for key in absent)  # keys the document lacks
        in_order += lines[:len(listed)] == doc.split("\n")[2:]  # as in the document
    assert in_order < len(texts) / 4  # shuffled (6-9 lines: in order 1 time in 500+)
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_texts(tmp_path / "bad.jsonl")


def test_listing_products_join_the_corpus_only(demo, tmp_path):
    paths, train, heldout = demo
    more = make_demo(tmp_path / "more", seed=3, listing_products=30)
    assert load_records(more.train).items == train  # the asked products do not move
    assert load_records(more.heldout).items == heldout
    texts, catalogue, by_doc = _catalogue_texts(more)
    listing = [p for p in catalogue if p["split"] == "listing"]
    assert len(listing) == 30 and len({p["id"] for p in catalogue}) == len(catalogue)
    assert len({p["name"] for p in catalogue}) == len(catalogue)
    docs = {text.split("\n\n")[0] for text in texts}
    assert {by_doc[d]["split"] for d in docs} == {"train", "listing"}
    assert len(docs) == len(texts) == len(catalogue) - sum(p["split"] == "heldout"
                                                           for p in catalogue)
    asked = {r.id.split("-")[0] for r in train + heldout}
    assert not asked & {p["id"] for p in listing}
    with pytest.raises(ValueError, match="listing_products"):
        make_demo(tmp_path / "bad", listing_products=-1)


def test_rl_products_are_asked_only_in_the_rl_split(demo, tmp_path):
    paths, train, heldout = demo
    assert load_records(paths.rl).items == [] and paths.num_rl == 0
    more = make_demo(tmp_path / "more", seed=3, listing_products=5, rl_products=7)
    assert load_records(more.train).items == train  # the other splits do not move
    assert load_records(more.heldout).items == heldout
    rl = load_records(more.rl).items
    assert more.num_rl == len(rl) == 7 * 8
    catalogue = json.loads(more.catalogue.read_text())["products"]
    by_id = {p["id"]: p for p in catalogue}
    assert len(by_id) == len(catalogue) and len({p["name"] for p in catalogue}) == len(catalogue)
    rl_ids = {r.id.split("-")[0] for r in rl}
    assert {by_id[i]["split"] for i in rl_ids} == {"rl"} and len(rl_ids) == 7
    seen = {r.product_doc for r in train + heldout}
    seen |= {line["text"].split("\n\n")[0] for line in map(json.loads, more.pretrain.open())}
    assert not seen & {r.product_doc for r in rl}  # an RL document appears nowhere else
    for r in rl:  # references follow the documents as in the other splits
        doc = parse_product_doc(r.product_doc)
        attr = asked_attribute(r.question)
        if attr in doc:
            assert doc[attr] in r.reference, r
        else:
            assert any(m in r.reference for m in REFUSAL_MARKERS), r
    assert make_demo(tmp_path / "again", seed=3, listing_products=5, rl_products=7).num_rl == 56
    assert load_records(tmp_path / "again" / "rl.jsonl").items == rl  # deterministic
    with pytest.raises(ValueError, match="rl_products"):
        make_demo(tmp_path / "bad", rl_products=-1)


def test_references_match_documents(demo):
    _, train, heldout = demo
    refusals = 0
    for r in train + heldout:
        doc = parse_product_doc(r.product_doc)
        attr = asked_attribute(r.question)
        assert attr is not None, r.question
        if attr in doc:
            assert doc[attr] in r.reference, r
            assert not any(m in r.reference for m in REFUSAL_MARKERS)
        else:
            refusals += 1
            assert any(m in r.reference for m in REFUSAL_MARKERS), r
        for user, assistant in zip(r.history[::2], r.history[1::2]):
            assert (user.role, assistant.role) == ("user", "assistant")
            assert doc[asked_attribute(user.content)] in assistant.content
    assert 0.1 < refusals / len(train + heldout) < 0.3
    assert any(r.history for r in train) and any(not r.history for r in train)


# --- the teacher -------------------------------------------------------------------------

def _states(answer, attr, value):
    """``value`` is in ``answer`` and not only as part of a longer value ("extra large")."""
    return value in answer and not any(value != w and value in w and w in answer
                                       for w in ATTRIBUTES[attr])


def _is_correct(record, answer):
    doc = parse_product_doc(record.product_doc)
    attr = asked_attribute(record.question)
    refuses = any(m in answer for m in REFUSAL_MARKERS)
    return refuses if attr not in doc else (_states(answer, attr, doc[attr]) and not refuses)


def test_teacher_responses(demo):
    _, train, _ = demo
    teacher = DemoTeacher(seed=7)
    k, wrong, total, lengths = 4, 0, 0, set()
    for record in train:
        responses = teacher.respond(record, k)
        assert len(responses) == k
        assert teacher.respond(record, 2) == responses[:2]  # depends on (seed, id) only
        for text in responses:
            assert text.startswith("<think>") and "</think> " in text
            reasoning, answer = split_response(text)
            assert "Let me check the product document." in reasoning
            # the lookup follows the question; the verbose part comes after the conclusion
            assert reasoning.startswith(f'The viewer asks: "{record.question}"')
            refuses = "So the answer is" not in reasoning
            conclusion = ("So I should say that the document does not list it." if refuses
                          else "So the answer is")
            assert reasoning.index("Let me check") < reasoning.index(conclusion)
            # the lookup is a catalogue line whose value decides the answer
            attr = asked_attribute(record.question)
            lookup = f'Looking it up: "{attr}: ' + ('not listed"' if refuses else '')
            assert reasoning.index(lookup) < reasoning.index(conclusion)
            assert len(answer.split()) < 25 < len(reasoning.split())
            lengths.add(len(reasoning.split()))
            wrong += not _is_correct(record, answer)
            total += 1
    assert len(lengths) > 10
    p, sigma = 0.25, math.sqrt(total * 0.25 * 0.75)
    assert abs(wrong - p * total) < 4 * sigma, (wrong, total)
    perfect = DemoTeacher(seed=7, error_rate=0.0)
    assert all(_is_correct(r, split_response(t)[1]) for r in train[:40]
               for t in perfect.respond(r, 2))
    assert DemoTeacher(seed=8).respond(train[0], 4) != teacher.respond(train[0], 4)
    with pytest.raises(ValueError, match="error_rate"):
        DemoTeacher(seed=0, error_rate=1.5)


@pytest.mark.parametrize("text, expected", [
    ("<think> r </think> a ", ("r", "a")),
    ("<think>r</think>", ("r", "")),
    ("<think>unclosed reasoning", ("unclosed reasoning", "")),
    ("just an answer", ("", "just an answer")),
    ("", ("", "")),
    ("r</think> a", ("r", "a")),  # the opening tag was in the prompt
    ("x <think>r</think> a", ("r", "x a")),
    ("<think>r</think> a </think> b", ("r", "a </think> b")),
])
def test_split_response(text, expected):
    assert split_response(text) == expected


def test_cli_make_demo(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "make-demo", "--out", str(out), "--products", "6",
                     "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"catalogue.json", "train.jsonl", "rl.jsonl",
                                               "heldout.jsonl", "corpus.txt", "pretrain.jsonl"}
    assert len(load_records(out / "train.jsonl").items) == 5 * 8
    assert "Let me check the product document." in (out / "corpus.txt").read_text()
    assert cli_main(["data", "make-demo", "--out", str(out), "--products", "0"]) == 2
    listed = tmp_path / "listed"
    assert cli_main(["data", "make-demo", "--out", str(listed), "--products", "6",
                     "--listing-products", "5", "--seed", "1"]) == 0
    assert len((listed / "pretrain.jsonl").read_text().splitlines()) == 5 + 5
    assert cli_main(["data", "make-demo", "--out", str(listed), "--listing-products",
                     "-1"]) == 2
    assert cli_main(["data", "make-demo", "--out", str(listed), "--products", "6",
                     "--rl-products", "3", "--seed", "1"]) == 0
    assert len(load_records(listed / "rl.jsonl").items) == 3 * 8
    assert cli_main(["data", "make-demo", "--out", str(listed), "--rl-products", "-1"]) == 2
