"""Training checkpoints: the model in Hugging Face format plus everything needed to resume.

Layout under ``output_dir/checkpoints``: ``step-00000012/`` holding ``model/`` (safetensors,
config.json, tokenizer files), ``optimizer/`` (fp32 masters, Adam's moments and step counts
written by ``torch.distributed.checkpoint``: each rank its own FSDP shards, readable by any
number of ranks), ``trainer_state.pt`` (the lr schedule, RNG states, data position, run
statistics; tensors and plain data only, read back with ``weights_only=True``) and
``config.yaml``; ``LATEST`` names the newest. A
checkpoint is written in a temporary directory, fsynced and swapped into place, then
``LATEST`` is replaced atomically, so a crash mid-save (kill -9, power loss) leaves LATEST
naming a whole checkpoint; `clean_interrupted_saves` clears the temporaries such a crash
leaves, at the start of the next run.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

from livethinking.data.atomic import (remove_stale_temporaries, replace_directory,
                                      temporary_directory_for, write_text_atomic)

__all__ = ["checkpoint_collectively", "clean_interrupted_saves", "latest_checkpoint",
           "load_trainer_state", "restore_optimizer", "rng_state", "save_final_model",
           "save_training_checkpoint", "set_rng_state"]

_EARLIER_TEMPORARY = re.compile(r"^\.(tmp-step-\d+-\d+|LATEST-\d+)$")  # before atomic.py


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def save_training_checkpoint(output_dir, step: int, model, tokenizer, trainer_state: dict,
                             config_yaml: str, *, keep: int = 2, model_state=None,
                             into: Path | None = None) -> Path:
    """Write checkpoint ``step`` durably and atomically, point LATEST at it, keep the newest
    ``keep`` (<= 0: all). ``model_state``: the full state dict to write instead of the
    model's own (FSDP2). ``into``: the checkpoint's temporary directory (from
    `temporary_directory_for`), already holding parts other ranks wrote (the sharded
    optimizer); by default a new one.

    The checkpoint is written in ``.step-N.tmp-*``, fsynced and swapped into place
    (`replace_directory`: an existing ``step-N`` is replaced, never missing), then LATEST is
    replaced atomically and fsynced. Older steps beyond ``keep`` and any step after ``step``
    (left by an abandoned later run in the same folder) are deleted last, so LATEST always
    names a whole checkpoint."""
    final = _checkpoint_path(output_dir, step)
    root, name = final.parent, final.name
    tmp = into if into is not None else temporary_directory_for(final)
    try:
        if model_state is None:
            model.save_pretrained(tmp / "model", tokenizer=tokenizer)
        else:
            from livethinking.model.checkpoint import save_checkpoint

            save_checkpoint(model_state, model.config.to_dict(), tmp / "model", tokenizer=tokenizer)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "LATEST", name)
    if keep > 0:
        others = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        older = [p for p in others if p.name < name]
        later = [p for p in others if p.name > name]
        for path in older[:max(len(older) - (keep - 1), 0)] + later:
            shutil.rmtree(path, ignore_errors=True)
    return final


def clean_interrupted_saves(output_dir) -> list[str]:
    """Clear what saves killed mid-way left in ``output_dir`` (the final model's
    ``.final.tmp-*`` / ``.final.old-*``) and in ``output_dir/checkpoints`` (``.step-N.tmp-*``,
    ``.LATEST.tmp-*``, and the ``.tmp-step-*`` / ``.LATEST-*`` names of earlier versions);
    a directory a dying save had moved aside is put back (`remove_stale_temporaries`).

    The main rank calls it at the start of a run (`start_run`), before reading LATEST and
    before anything is saved; it tolerates a second process clearing the same folder at
    once. Never call it while a save into ``output_dir`` is under way. Returns one line per
    action."""
    out = Path(output_dir)
    root = out / "checkpoints"
    actions = remove_stale_temporaries(out) + remove_stale_temporaries(root)
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not _EARLIER_TEMPORARY.match(entry.name):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        actions.append(f"removed {entry}")
    return actions


def latest_checkpoint(output_dir) -> Path | None:
    """The checkpoint LATEST names, or None when there is none."""
    pointer = Path(output_dir) / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which holds no trainer_state.pt")
    return path


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")


def checkpoint_collectively(output_dir, step: int, model, tokenizer, optimizer, extra: dict,
                            config_yaml: str, dist, *, dtype: torch.dtype | None = None) -> None:
    """Every rank calls this. Rank 0 makes the checkpoint's temporary directory; every rank
    writes its shards of the optimizer state into it (`MasterWeightAdamW.save_sharded`:
    nobody gathers the fp32 state); the model is gathered to rank 0 (in ``dtype``, the
    run's, when the parameters are fp32 masters), which writes it with the trainer state
    and swaps the checkpoint into place. A single process does all of it alone."""
    from livethinking.train.distributed import barrier, broadcast_from_main, full_state_dict

    made = str(temporary_directory_for(_checkpoint_path(output_dir, step))) \
        if dist.is_main else None
    tmp = Path(broadcast_from_main(made, dist))
    try:
        meta = optimizer.save_sharded(tmp / "optimizer", distributed=dist.world_size > 1)
        model_state = full_state_dict(model, dist, dtype=dtype) \
            if dist.world_size > 1 else None
        state = {"step": step, "optimizer": meta, "rng": rng_state(), **extra}
        if dist.is_main:
            save_training_checkpoint(output_dir, step, model, tokenizer, state, config_yaml,
                                     model_state=model_state, into=tmp)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(dist)


def restore_optimizer(optimizer, checkpoint: Path, saved: dict, dist) -> None:
    """Load a checkpoint's optimizer state into ``optimizer`` (every rank calls it):
    the sharded form (``optimizer/``, resharded to this run's ranks), or the gathered dict
    that checkpoints written before it hold in ``trainer_state.pt``."""
    if saved.get("format") == "dcp":
        optimizer.load_sharded(checkpoint / "optimizer", saved,
                               distributed=dist.world_size > 1)
    else:
        optimizer.load_state_dict(saved)


def save_final_model(path, model, tokenizer, dist, *, dtype: torch.dtype | None = None
                     ) -> Path:
    """Every rank calls this: the final model in Hugging Face format (gathered from FSDP2
    shards to rank 0 when sharded, in ``dtype`` when given)."""
    path = Path(path)
    if dist.world_size == 1:
        return model.save_pretrained(path, tokenizer=tokenizer)
    from torch.distributed import barrier

    from livethinking.model.checkpoint import save_checkpoint
    from livethinking.train.distributed import full_state_dict

    state = full_state_dict(model, dist, dtype=dtype)  # a collective: every rank takes part
    if dist.is_main:
        save_checkpoint(state, model.config.to_dict(), path, tokenizer=tokenizer)
    barrier()
    return path
