"""README.md says what is true: the commands it shows point at files that exist, and its
GPU status matches what benchmarks/RESULTS.md has measured."""

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _config_arguments() -> list[str]:
    paths = []
    for block in _bash_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            paths += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"]
    return paths


def test_readme_config_paths_exist():
    paths = _config_arguments()
    assert paths, "README shows no --config command"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"README's --config arguments name files that do not exist: {missing}"


@pytest.mark.parametrize("name", ["rft.yaml", "grpo.yaml", "dpo.yaml", "agent_sft.yaml",
                                  "agent_grpo.yaml"])
def test_readme_names_each_shipped_config(name):
    assert f"configs/{name}" in README


def test_readme_states_the_teacher_endpoint_configs_rft_expects():
    import yaml

    teacher = yaml.safe_load((ROOT / "configs" / "rft.yaml").read_text())["teacher"]
    if teacher["kind"] == "openai":
        assert teacher["base_url"] in README and f"`{teacher['model']}`" in README


def test_readme_has_no_stale_for_now_line():
    assert "for now" not in README.lower()


def _has_gpu_results() -> bool:
    """A RESULTS.md section measured on a GPU names it on its ``Device:`` line."""
    devices = re.findall(r"^Device:(.*)$", RESULTS, flags=re.M)
    return any(re.search(r"\b(H100|H200|A100|NVIDIA|GPU\b(?! lent))", d)
               and "no GPU" not in d for d in devices)


def test_readme_gpu_status_matches_results():
    says_unrun = "GPU paths have not yet run on hardware" in README
    assert says_unrun != _has_gpu_results(), (
        "README must say the GPU paths have not yet run on hardware exactly while "
        "benchmarks/RESULTS.md has no GPU entries")
