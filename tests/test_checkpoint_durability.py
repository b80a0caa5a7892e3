"""Checkpoints survive crashes: killed saves leave nothing behind after the next start, every
file and directory is fsynced before it counts, and replacing an existing checkpoint or final
model never loses the old one (the swap of livethinking.data.atomic.replace_directory)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from livethinking.data import atomic
from livethinking.model import CausalLM, ModelConfig
from livethinking.train import checkpointing
from livethinking.train.checkpointing import (clean_interrupted_saves, latest_checkpoint,
                                              load_trainer_state, save_training_checkpoint)
from livethinking.train.common import start_run
from livethinking.train.config import RunConfig

TINY = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=8, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
            max_position_embeddings=32, moe_intermediate_size=8, num_experts=2,
            num_experts_per_tok=1)


class Crash(BaseException):
    """Stands for the process dying at the patched call (no except clause swallows it)."""


def crash(*args, **kwargs):
    raise Crash()


def tiny_model(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**TINY)).float()


def save_step(out, step, seed, **kwargs):
    return save_training_checkpoint(out, step, tiny_model(seed), None, {"step": step, "seed": seed},
                                    f"seed: {seed}\n", **kwargs)


def assert_loadable(checkpoint, seed):
    """The checkpoint's trainer state and model are whole and are those of ``seed``."""
    assert load_trainer_state(checkpoint)["seed"] == seed
    loaded = CausalLM.from_pretrained(checkpoint / "model")
    for (name, a), b in zip(loaded.state_dict().items(), tiny_model(seed).state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync is called on, in order (Linux: read back from /proc/self/fd)."""
    paths = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_start_run_clears_what_killed_saves_left(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_step(out, 1, seed=1)
    root = out / "checkpoints"
    # what a save killed while writing leaves: its temporary trees and pointer files (the
    # names this version writes and the earlier version's), and a half-written final model
    monkeypatch.setattr(checkpointing.torch, "save", crash)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", lambda *a, **k: None)  # no clean-up: killed
    with pytest.raises(Crash):
        save_step(out, 2, seed=2)
    monkeypatch.undo()
    (root / ".tmp-step-00000002-4242" / "model").mkdir(parents=True)
    (root / ".LATEST-4242").write_text("step-00000002")
    (root / ".LATEST.tmp-x1y2").write_text("step-00")
    (out / ".final.tmp-abcd").mkdir()
    (out / ".final.tmp-abcd" / "model.safetensors").write_bytes(b"\0" * 8)
    assert len(leftovers(root)) == 4

    start = start_run(RunConfig(output_dir=str(out), device="cpu"), tmp_path / "unused", resume=True)
    assert leftovers(root) == [] and leftovers(out) == []
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000001"]
    assert start.checkpoint == root / "step-00000001"
    assert_loadable(start.checkpoint, seed=1)


def test_every_file_and_directory_is_fsynced_before_it_counts(tmp_path, synced):
    out = tmp_path / "run"
    step = save_step(out, 1, seed=1)
    tiny_model(2).save_pretrained(out / "final")
    # temporaries are synced under their own names: map them to the names they end up with
    final_names = [re.sub(r"/\.([^/]+)\.tmp-[^/]+", r"/\1", path) for path in synced]
    expected_files = [str(p) for p in step.rglob("*") if p.is_file()]
    expected_files += [str(p) for p in (out / "final").rglob("*") if p.is_file()]
    expected_files.append(str(out / "checkpoints" / "LATEST"))
    missing = [p for p in expected_files if p not in final_names]
    assert not missing, f"never fsynced: {missing}"
    for directory in (step, step / "model", out / "final"):  # their entries, before the rename
        assert str(directory) in final_names, directory
    # the parents, after the renames into them: the last syncs of each save
    assert synced.index(str(out / "checkpoints")) > final_names.index(str(step / "trainer_state.pt"))
    assert synced[-1] == str(out)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_resaving_the_latest_checkpoint_never_loses_it(tmp_path, monkeypatch, exchange):
    """A crash at the moment the new directory is put in place (the old code had just deleted
    the old one there) leaves LATEST naming a whole checkpoint, after the next start."""
    out = tmp_path / "run"
    save_step(out, 1, seed=1)
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, real_replace = os.rename, os.replace

    def crash_on_directory_move(real):
        def move(src, dst, *args, **kwargs):
            if os.path.isdir(src) and os.path.basename(dst) == "step-00000001" \
                    and ".tmp-" in os.path.basename(src):
                raise Crash()
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", crash_on_directory_move(real_rename))
    monkeypatch.setattr(os, "replace", crash_on_directory_move(real_replace))
    if exchange:  # crash just after the swap, before the old one is deleted
        monkeypatch.setattr(atomic.shutil, "rmtree", crash)
    with pytest.raises(Crash):
        save_step(out, 1, seed=2)
    monkeypatch.undo()
    clean_interrupted_saves(out)
    assert leftovers(out / "checkpoints") == []
    assert_loadable(latest_checkpoint(out), seed=2 if exchange else 1)


def test_resaving_a_final_model_keeps_a_whole_one_at_every_step(tmp_path, monkeypatch):
    """Rename-aside path: the old final is recoverable after a crash between the renames;
    exchange path: the path never stops naming a whole model."""
    final = tmp_path / "final"
    tiny_model(1).save_pretrained(final)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(dst) == "final" and ".tmp-" in str(src):
            raise Crash()
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        tiny_model(2).save_pretrained(final)
    monkeypatch.undo()
    assert CausalLM.from_pretrained(final).state_dict().keys()  # put back by the handler
    assert leftovers(tmp_path) == []

    seen_missing, swapped = [], []
    real_exchange = atomic._exchange

    def watched_exchange(a, b):
        seen_missing.append(not (b / "config.json").is_file())
        swapped.append(real_exchange(a, b))
        seen_missing.append(not (b / "config.json").is_file())
        return swapped[-1]

    monkeypatch.setattr(atomic, "_exchange", watched_exchange)
    tiny_model(3).save_pretrained(final)
    assert seen_missing == [False, False]
    if sys.platform.startswith("linux"):  # renameat2(RENAME_EXCHANGE): ext4, xfs, btrfs, tmpfs
        assert swapped == [True], "the filesystem of the test's tmp_path refused the exchange"
    for a, b in zip(CausalLM.from_pretrained(final).state_dict().values(),
                    tiny_model(3).state_dict().values()):
        assert torch.equal(a, b)


def test_os_replace_refuses_a_non_empty_directory(tmp_path):
    """Why replace_directory swaps instead of os.replace (the cause of the old rmtree first)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(OSError):
        os.replace(tmp_path / "a", tmp_path / "b")


KILLED_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from livethinking.data import atomic
    from livethinking.model import CausalLM, ModelConfig
    from livethinking.train import checkpointing

    out, point, tiny = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    def model(seed):
        torch.manual_seed(seed)
        return CausalLM(ModelConfig(**tiny)).float()
    def save(step, seed):
        checkpointing.save_training_checkpoint(out, step, model(seed), None,
                                               {"step": step, "seed": seed}, "a: 1\\n")
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    save(1, 1)
    if point == "writing":  # mid-save of a new step: the model written, its trainer state not
        checkpointing.torch.save = die
        save(2, 2)
    else:  # mid-swap of the step LATEST names, between moving it aside and the new one in
        atomic._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(src, dst):
            if os.path.basename(dst) == "step-00000001" and ".tmp-" in os.path.basename(src):
                die()
            real_rename(src, dst)
        atomic.os.rename = rename
        save(1, 2)
    print("not killed")
""")


@pytest.mark.parametrize("point", ["writing", "swapping"])
def test_kill_9_during_a_save_leaves_latest_loadable(tmp_path, point):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out), point, json.dumps(TINY)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    root = out / "checkpoints"
    assert leftovers(root), "the kill should have left a temporary behind"
    clean_interrupted_saves(out)
    assert leftovers(root) == []
    assert_loadable(latest_checkpoint(out), seed=1)


def test_keep_never_deletes_the_checkpoint_latest_names(tmp_path):
    """keep=1 with a later step left by an abandoned run in the same folder: the old sort
    kept only that later step and deleted the one just written, which LATEST named."""
    out = tmp_path / "run"
    save_step(out, 5, seed=5)  # an earlier run got further
    save_step(out, 1, seed=1, keep=1)  # a fresh run in the same folder
    assert_loadable(latest_checkpoint(out), seed=1)
    save_step(out, 2, seed=2, keep=2)
    save_step(out, 3, seed=3, keep=2)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002",
                                                                           "step-00000003"]
    assert_loadable(latest_checkpoint(out), seed=3)


def test_write_text_atomic_syncs_and_leaves_no_temporary(tmp_path, synced):
    atomic.write_text_atomic(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello" and leftovers(tmp_path) == []
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/\.a\.txt\.tmp-\w+", synced[0])
    assert synced[-1] == str(tmp_path)
