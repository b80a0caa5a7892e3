"""The floors of ARCHITECTURE.md, read from the source: every import (module-level or inside
a function) of every module under livethinking/ and kernels/ points down a floor, and the
lines that must never exist do not."""

import ast
import pathlib

import pytest

import livethinking
import livethinking.kernels

ROOTS = {"livethinking": pathlib.Path(livethinking.__file__).parent,
         "livethinking.kernels": pathlib.Path(livethinking.kernels.__file__).parent}
FLOORS = {  # first name under livethinking -> floor (ARCHITECTURE.md)
    "_C": 0, "_extension": 0, "_triton_probe": 0,
    "kernels": 1, "tasks": 1, "envs": 1, "rewards": 1, "data": 1,
    "ops": 2, "model": 3, "engine": 4, "rollout": 5, "train": 6, "server": 6,
    "info": 7, "cli": 7, "__main__": 7,
}
SAME_FLOOR = {("rewards", "data"), ("rewards", "tasks"), ("tasks", "data"),
              ("envs", "tasks"), ("envs", "data"),  # floor-1 peers
              ("__main__", "cli"), ("cli", "info")}  # the command's own parts
FORBIDDEN = [  # (importer, imported, the ARCHITECTURE.md line)
    ("kernels", "*", "a kernel file imports nothing of livethinking (it stays vendorable)"),
    ("ops", "model", "ops know nothing of models"),
    ("model", "engine", "the model never schedules requests"),
    ("model", "train", "the model never trains itself"),
    ("engine", "server", "the engine knows no HTTP"),
    ("engine", "train", "the engine knows no trainer"),
    ("engine", "rollout", "the engine knows no rollouts"),
    ("engine", "kernels", "the engine reaches kernels through livethinking.ops"),
    ("model", "kernels", "the model reaches kernels through livethinking.ops"),
    ("train", "cli", "train/ never imports the command on top of it"),
    ("server", "train", "the server never imports train/"),
]


def _modules():
    """(dotted module name, path) of every source file."""
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([package, *parts]), path


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The absolute names ``module`` imports, anywhere in the file; ``from a import b``
    counts as both ``a`` and ``a.b`` (b may be a submodule)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package[:len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _component(name: str) -> str | None:
    """The first name under livethinking (``livethinking.kernels.x`` -> ``kernels``); None
    for other packages and for ``livethinking`` itself."""
    parts = name.split(".")
    return parts[1] if parts[0] == "livethinking" and len(parts) > 1 else None


EDGES = {}  # (importer component, imported component) -> the modules that hold the edge
for _module, _path in _modules():
    _own = _component(_module)
    for _name in _imports(_module, _path):
        _target = _component(_name)
        if _target is not None and _target != _own and _target in FLOORS:
            EDGES.setdefault((_own, _target), set()).add(_module)


def test_the_walk_sees_the_package():
    components = {a for a, _ in EDGES} | {b for _, b in EDGES}
    assert {"ops", "model", "engine", "train", "server", "cli", "kernels"} <= components
    assert ("engine", "model") in EDGES and ("cli", "train") in EDGES  # real edges are found


def test_every_component_has_a_floor():
    components = {_component(m) for m, _ in _modules()} - {None}
    assert components <= set(FLOORS), components - set(FLOORS)


@pytest.mark.parametrize("importer,imported,rule", FORBIDDEN, ids=lambda x: str(x)[:20])
def test_the_lines_that_must_never_exist(importer, imported, rule):
    found = {edge: mods for edge, mods in EDGES.items()
             if edge[0] == importer and imported in ("*", edge[1])}
    assert not found, f"{rule}: {found}"


def test_nothing_reaches_up_a_floor():
    up = {edge: sorted(mods) for edge, mods in EDGES.items()
          if FLOORS[edge[1]] > FLOORS[edge[0]]
          or (FLOORS[edge[1]] == FLOORS[edge[0]] and FLOORS[edge[0]] > 0
              and edge not in SAME_FLOOR)}
    assert not up, up


def test_the_walk_resolves_relative_and_function_level_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from . import ops\nfrom ..cli import main\n"
                      "def f():\n    import livethinking.server.app\n")
    names = _imports("livethinking.train.mod", source)
    assert {"livethinking.train.ops", "livethinking.cli.main", "livethinking.server.app"} <= names


def test_the_trainer_entry_is_the_commands_rft_and_grpo(tmp_path, capsys):
    from livethinking.cli import build_parser
    from livethinking.train.entry import main, run_command

    args = build_parser().parse_args(["grpo", "--config", "c.yaml", "--resume", "optim.lr=1"])
    assert args.run is run_command
    assert (args.command, args.config, args.resume, args.overrides) == ("grpo", "c.yaml", True,
                                                                        ["optim.lr=1"])
    assert main(["rft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_every_package_is_installed():
    import tomllib

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    packages = {module for module, path in _modules() if path.name == "__init__.py"}
    assert packages <= listed, f"missing from pyproject.toml's packages: {packages - listed}"
