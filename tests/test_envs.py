"""The environment API and the shop simulator: every tool, bad calls, the turn budget,
the registry, the oracle."""

import dataclasses
import json

import pytest

from livethinking.envs import (EnvironmentRegistry, ShopConfig, ShopEnvironment, ToolCallError,
                               ToolEnvironment, ToolSpec, check_arguments, default_registry,
                               expert_trajectory, format_tool_call, make_shop_demo,
                               oracle_action, parse_tool_calls, shop_rewards)
from livethinking.tasks.livestream.domain import Product
from livethinking.tasks.shop import (ShopTask, asked_attributes, load_catalogue,
                                     load_shop_tasks, make_shop_data, parse_reply,
                                     shopper_reply)
from livethinking.tasks.shop.demo_data import REQUEST_TEMPLATES


def _products():
    base = {"color": "red", "price": "29 dollars", "material": "glass", "capacity": "1 liter"}
    def product(i, name, category, attributes):
        return Product(id=i, name=name, category=category, attributes=attributes)

    return (product("s1", "Ember Aria Kettle", "kettle", dict(base)),
            product("s2", "Ember Aria Kettle", "kettle", {**base, "color": "blue"}),
            product("s3", "Ember Aria Kettle", "kettle", {**base, "material": "plastic"}),
            product("s4", "Comet Nova Lamp", "lamp", {"color": "red", "price": "19 dollars"}))


def _task(**overrides):
    fields = dict(id="t0", request="I want to buy a Ember Aria Kettle.", family="Ember Aria Kettle",
                  category="kettle", preferences={"color": "blue", "material": "glass",
                                                  "capacity": "1 liter"},
                  target_id="s2", required=("color", "material"))
    return ShopTask(**{**fields, **overrides})


def _env(**overrides):
    return ShopEnvironment(ShopConfig(products=_products(), **overrides))


def _call(env, name, **arguments):
    return env.step(format_tool_call(name, arguments))


# ---------------------------------------------------------------------------- tool calls
def test_parse_tool_calls_reads_every_block_and_string_arguments():
    text = ('thinking <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> and '
            '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": [2]}"}\n</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {"y": [2]})]
    assert parse_tool_calls("no call at all") == []
    assert parse_tool_calls(format_tool_call("buy", {"product_id": "s1"}))[0].arguments == {
        "product_id": "s1"}


@pytest.mark.parametrize("text, message", [
    ("<tool_call>{not json}</tool_call>", "not valid JSON"),
    ('<tool_call>["a"]</tool_call>', 'string "name"'),
    ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "a", "arguments": "{bad"}</tool_call>', "not valid JSON"),
    ('<tool_call>{"name": "a", "arguments": {}}', "not closed"),
])
def test_parse_tool_calls_names_the_problem(text, message):
    with pytest.raises(ToolCallError, match=message):
        parse_tool_calls(text)


def test_check_arguments_required_unknown_and_types():
    spec = ToolSpec("t", "d", {"q": {"type": "string"}, "n": {"type": "integer"},
                               "ids": {"type": "array", "items": {"type": "string"}}}, ("q",))
    check_arguments(spec, {"q": "x", "n": 3, "ids": ["a"]})
    for arguments, message in [({}, "needs the argument"), ({"q": "x", "z": 1}, "no argument"),
                               ({"q": 1}, "q must be a JSON string"),
                               ({"q": "x", "n": True}, "n must be a JSON integer"),
                               ({"q": "x", "ids": ["a", 2]}, "every item of ids")]:
        with pytest.raises(ToolCallError, match=message):
            check_arguments(spec, arguments)
    schema = spec.schema()
    assert schema["type"] == "function" and schema["function"]["name"] == "t"
    assert schema["function"]["parameters"]["required"] == ["q"]


# ---------------------------------------------------------------------------- the shop
def test_every_tool_of_the_shop():
    env = _env()
    opening = env.reset(_task())
    assert [m["role"] for m in opening] == ["system", "user"]
    assert {t["function"]["name"] for t in env.tools()} == {"search", "view", "compare",
                                                            "ask_user", "buy"}
    result = _call(env, "search", query="ember aria kettle")
    assert result.observation[0]["role"] == "tool" and not result.done
    assert result.observation[0]["content"].splitlines() == [
        "3 results:", "s1 Ember Aria Kettle, 29 dollars", "s2 Ember Aria Kettle, 29 dollars",
        "s3 Ember Aria Kettle, 29 dollars"]
    filtered = _call(env, "search", query="Ember Aria Kettle", filters={"color": "Blue"})
    assert filtered.observation[0]["content"] == "1 result:\ns2 Ember Aria Kettle, 29 dollars"
    assert _call(env, "search", query="kettle", filters={"color": "pink"}
                 ).observation[0]["content"] == "no results"
    view = _call(env, "view", product_id="s3").observation[0]["content"]
    assert "id: s3" in view and "material: plastic" in view
    compare = _call(env, "compare", ids=["s1", "s2", "s3"]).observation[0]["content"]
    assert compare.splitlines() == ["color: s1 red, s2 blue, s3 red",
                                    "material: s1 glass, s2 glass, s3 plastic"]
    reply = _call(env, "ask_user", question="Which colour and material do you like?")
    assert reply.observation[0]["content"] == "I want color: blue, material: glass."
    bought = _call(env, "buy", product_id="s2")
    assert bought.done and bought.reward == pytest.approx(1.5)
    assert bought.info["strict"] == 1.0 and bought.info["loose"] == 1.0
    assert bought.info["turns"] == 7 and bought.info["end"] == "bought"
    with pytest.raises(RuntimeError, match="episode is over"):
        _call(env, "view", product_id="s1")


def test_buying_a_near_duplicate_earns_loose_credit_only():
    env = _env(loose_weight=0.5)
    env.reset(_task())
    result = _call(env, "buy", product_id="s1")  # right material, wrong color
    assert result.done and result.info["strict"] == 0.0 and result.info["loose"] == 0.5
    assert result.reward == pytest.approx(0.25)
    assert shop_rewards(_task(), None) == (0.0, 0.0)
    assert shop_rewards(_task(required=()), _products()[0]) == (0.0, 1.0)


@pytest.mark.parametrize("action, message", [
    ("I think the blue one.", "no tool call"),
    ("<tool_call>{oops</tool_call>", "not valid JSON"),
    (format_tool_call("checkout", {}), "unknown tool 'checkout'"),
    (format_tool_call("view", {}), "needs the argument"),
    (format_tool_call("view", {"product_id": "s9"}), "no product has id 's9'"),
    (format_tool_call("view", {"product_id": 7}), "must be a JSON string"),
    (format_tool_call("compare", {"ids": ["s1"]}), "2 to 5 ids"),
    (format_tool_call("search", {"query": "kettle", "filters": {"colour": "red"}}),
     "unknown filter"),
    (format_tool_call("search", {"query": "!!"}), "no words"),
    (format_tool_call("buy", {"product_id": "s1", "qty": 2}), "no argument"),
])
def test_bad_calls_become_error_observations(action, message):
    env = _env()
    env.reset(_task())
    result = env.step(action)
    text = result.observation[-1]["content"]
    assert text.startswith("error:") and message in text
    assert not result.done and result.reward == 0.0 and result.info["tool_errors"] >= 1
    assert env.bought is None


def test_only_one_call_runs_per_turn():
    env = _env()
    env.reset(_task())
    result = env.step(format_tool_call("view", {"product_id": "s1"})
                      + format_tool_call("buy", {"product_id": "s1"}))
    assert not result.done and env.bought is None
    assert result.observation[0]["content"].startswith("error: at most 1")
    assert "id: s1" in result.observation[1]["content"]


def test_the_turn_budget_ends_the_episode_with_no_reward():
    env = _env(max_turns=3)
    env.reset(_task())
    for turn in range(3):
        result = _call(env, "ask_user", question="What color?")
        assert result.done == (turn == 2)
    assert result.reward == 0.0 and result.info["end"] == "turn budget"
    assert result.info["strict"] == 0.0 and result.info["asked"] == ["What color?"] * 3


def test_step_before_reset_and_bad_tasks():
    env = _env()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")
    with pytest.raises(ValueError, match="not in the catalogue"):
        env.reset(_task(target_id="s99"))
    with pytest.raises(TypeError, match="ShopTask"):
        env.reset({"id": "t0"})
    with pytest.raises(ValueError, match="exactly one of catalogue"):
        ShopConfig()
    with pytest.raises(ValueError, match="required attribute"):
        _task(required=("size",))


def test_the_shopper_reveals_only_what_is_asked():
    prefs = {"color": "blue", "capacity": "1.5 liters"}
    assert asked_attributes("How heavy, and which colour?") == ["weight", "color"]
    assert shopper_reply(prefs, "Which color?") == "I want color: blue."
    assert shopper_reply(prefs, "Which size and capacity?") == (
        "I want capacity: 1.5 liters. Any size is fine.")
    assert "do not understand" in shopper_reply(prefs, "Hello?")
    assert parse_reply("I want capacity: 1.5 liters, color: blue. Any size is fine.") == {
        "capacity": "1.5 liters", "color": "blue"}
    assert parse_reply("Any size is fine.") == {}


# ---------------------------------------------------------------------------- registry
@dataclasses.dataclass
class _CounterConfig:
    limit: int = 2


class _Counter(ToolEnvironment):
    Config = _CounterConfig
    tool_specs = (ToolSpec("tick", "count one"),)

    def __init__(self, config):
        self.config = config

    def reset(self, task):
        self.count = 0
        return [{"role": "user", "content": "tick"}]

    def tool_tick(self):
        self.count += 1
        return str(self.count)

    def after_turn(self):
        return float(self.count), self.count >= self.config.limit, {}


def test_the_registry_builds_registered_and_imported_environments():
    registry = default_registry()
    assert "shop" in registry.names()
    shop = registry.make("shop", {"products": _products(), "max_turns": 4})
    assert isinstance(shop, ShopEnvironment) and shop.config.max_turns == 4
    registry.register("counter", _Counter, _CounterConfig)
    env = registry.make("counter", {"limit": 1})
    env.reset(None)
    assert env.step(format_tool_call("tick", {})).done
    by_path = registry.make(f"{__name__}:_Counter")
    assert isinstance(by_path, _Counter) and by_path.config.limit == 2
    assert default_registry().names() == ["shop"]  # registries share nothing
    with pytest.raises(ValueError, match="already registered"):
        registry.register("counter", _Counter)
    with pytest.raises(ValueError, match="unknown environment 'maze'"):
        registry.make("maze")
    with pytest.raises(ValueError, match="cannot load"):
        registry.make("no_such_module_xyz:Env")
    with pytest.raises(ValueError, match="unknown config key"):
        registry.make("counter", {"limt": 1})
    with pytest.raises(TypeError, match="takes a _CounterConfig"):
        registry.make("counter", ShopConfig(products=_products()))
    with pytest.raises(ValueError, match="without ':'"):
        EnvironmentRegistry().register("a:b", _Counter)


# ---------------------------------------------------------------------------- data, oracle
def test_the_demo_shop_and_the_oracle(tmp_path):
    paths = make_shop_demo(tmp_path, num_families=12, heldout_families=4, seed=3)
    products = load_catalogue(paths.catalogue)
    train, heldout = load_shop_tasks(paths.train), load_shop_tasks(paths.heldout)
    new, rl = load_shop_tasks(paths.heldout_new), load_shop_tasks(paths.rl)
    assert (len(train), len(heldout), len(new), len(rl)) == (
        paths.num_train, paths.num_heldout, paths.num_heldout_new, paths.num_rl)
    assert 0 < len(rl) <= 12 and {t.family for t in rl} <= {t.family for t in train}
    assert len(heldout) == 12 and len(new) == 4 and 12 <= len(train) <= 24
    assert {t.family for t in train} == {t.family for t in heldout}
    assert {t.family for t in train}.isdisjoint({t.family for t in new})
    for shopper in heldout + rl:  # a variant no training shopper of its family wants
        assert shopper.target_id not in {t.target_id for t in train if t.family == shopper.family}
    assert not {(t.family, t.target_id) for t in rl} & {(t.family, t.target_id) for t in heldout}
    assert len({t.id for t in train + heldout + new + rl}) == len(train + heldout + new + rl)
    by_id = {p.id: p for p in products}
    for task in train + heldout + new + rl:
        family = [p for p in products if p.name == task.family]
        assert len(family) in (2, 4) and by_id[task.target_id] in family
        matching = [p for p in family if all(p.attributes[a] == task.preferences[a]
                                             for a in task.required)]
        assert matching == [by_id[task.target_id]]  # the required attributes identify it
    experts = [json.loads(line) for line in paths.expert.read_text().splitlines()]
    assert len(experts) == len(train) and all(e["strict"] == 1.0 for e in experts)
    env = ShopEnvironment(ShopConfig(catalogue=str(paths.catalogue)))
    for task in heldout + new:  # the oracle reads observations only: it serves anyone
        messages, info = expert_trajectory(env, task)
        assert info["strict"] == 1.0 and info["turns"] == 5
        assert [parse_tool_calls(m["content"])[0].name for m in messages
                if m["role"] == "assistant"] == ["search", "compare", "ask_user", "search",
                                                 "buy"]
    assert products[0].id in paths.corpus.read_text()
    again = make_shop_data(tmp_path / "again", num_families=12, heldout_families=4, seed=3)
    assert again.train.read_text() == paths.train.read_text()  # deterministic
    assert oracle_action(train[0], [{"role": "user", "content": "hi"}]).startswith(
        '<tool_call>{"name": "search"')


def test_an_environment_must_implement_reset_and_step():
    from livethinking.envs import Environment

    class Half(Environment):
        def reset(self, task):
            return []

    with pytest.raises(TypeError, match="abstract"):
        Half()
    with pytest.raises(NotImplementedError, match="does not load tasks"):
        _Counter.load_tasks("tasks.jsonl")


# ---------------------------------------------------------------------------- relabelled data
def test_relabel_shopper_keeps_the_shopper_and_changes_only_the_labels():
    import random

    from livethinking.tasks.shop.relabel import relabel_shopper, unused_family_names

    products, task = list(_products()[:3]), _task()
    names = unused_family_names(list(_products()))
    assert set(names) == {"kettle", "lamp"}
    assert "Ember Aria Kettle" not in names["kettle"] and "Comet Nova Lamp" not in names["lamp"]
    assert all(n.endswith(" Kettle") for n in names["kettle"])
    pool = [f"q{i}" for i in range(7)]
    copies = [relabel_shopper(random.Random(s), task, products, pool, names) for s in range(20)]
    for new_products, new_task in copies:
        assert len({p.id for p in new_products}) == 3 and {p.id for p in new_products} <= set(pool)
        assert len({p.name for p in new_products}) == 1 and new_task.family == new_products[0].name
        assert new_task.family in names["kettle"] and new_task.family in new_task.request
        assert [p.attributes for p in new_products] == [p.attributes for p in products]
        target = next(p for p in new_products if p.id == new_task.target_id)
        assert target.attributes == products[1].attributes  # the same variant, relabelled
        assert (new_task.preferences, new_task.required) == (task.preferences, task.required)
        messages, info = expert_trajectory(
            ShopEnvironment(ShopConfig(products=tuple(new_products))), new_task)
        assert info["strict"] == 1.0 and info["bought"] == new_task.target_id
    assert len({t.target_id for _, t in copies}) > 3 and len({t.family for _, t in copies}) > 3
    with pytest.raises(ValueError, match="fewer than the family's 3 variants"):
        relabel_shopper(random.Random(0), task, products, pool[:2], names)
    with pytest.raises(ValueError, match="no unused family name .* 'kettle'"):
        relabel_shopper(random.Random(0), task, products, pool, {"lamp": ["Comet Aria Lamp"]})


def test_the_demo_shop_with_relabelled_copies_and_pretraining_texts(tmp_path):
    plain = make_shop_demo(tmp_path / "plain", num_families=12, heldout_families=4, seed=3)
    paths = make_shop_demo(tmp_path / "more", num_families=12, heldout_families=4, seed=3,
                           relabelled_copies=2, pretrain_episodes=30)
    assert paths.train.read_text() == plain.train.read_text()  # the splits stay as they were
    assert paths.catalogue.read_text() == plain.catalogue.read_text()
    catalogue = load_catalogue(paths.catalogue)
    ids, names = {p.id for p in catalogue}, {p.name for p in catalogue}
    held_names = {t.family for t in load_shop_tasks(paths.heldout_new)}
    train = load_shop_tasks(paths.train)
    experts = [json.loads(line) for line in paths.expert.read_text().splitlines()]
    assert len(experts) == paths.num_expert == 3 * len(train)
    originals = [json.loads(line) for line in plain.expert.read_text().splitlines()]
    assert experts[:len(train)] == originals
    copies = experts[len(train):]
    assert [e["task_id"] for e in copies] == [f"{t.id}~{c}" for c in range(2) for t in train]
    for record in copies:
        calls = [parse_tool_calls(m["content"])[0] for m in record["messages"]
                 if m["role"] == "assistant"]
        assert record["strict"] == 1.0 and [c.name for c in calls] == [
            "search", "compare", "ask_user", "search", "buy"]
        assert calls[0].arguments["query"] not in names  # a name no catalogue family has
        assert set(calls[1].arguments["ids"]) <= ids and calls[4].arguments["product_id"] in ids
    texts = [json.loads(line)["text"] for line in paths.pretrain.read_text().splitlines()]
    assert len(texts) == paths.num_pretrain == 30 and len(set(texts)) == 30
    for text in texts:
        lines = text.splitlines()
        family = parse_tool_calls(lines[1])[0].arguments["query"]
        assert lines[0] in [t.format(family=family) for t in REQUEST_TEMPLATES]
        assert "shopping assistant" not in text  # the system prompt is left out
        bought = lines[-1].removeprefix("Order placed for ").removesuffix(".")
        assert lines[-1] == f"Order placed for {bought}." and bought in ids
        assert '"name": "compare"' in text and "I want " in text
    for name in held_names | names:  # no catalogue family's name, held out or not
        assert name not in paths.pretrain.read_text()
        assert all(name not in json.dumps(e) for e in copies)
    assert not plain.pretrain.read_text() and plain.num_pretrain == 0
    with pytest.raises(ValueError, match="relabelled_copies must be an int >= 0"):
        make_shop_demo(tmp_path / "bad", num_families=2, heldout_families=1, relabelled_copies=-1)
