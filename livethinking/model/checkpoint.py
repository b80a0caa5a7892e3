"""Reading and writing Qwen3 / Qwen3-MoE checkpoints in the Hugging Face safetensors layout.

In memory, parameters carry transformers' names, with each MoE layer's experts fused:
``<layer>.mlp.experts.gate_up_proj`` (E, 2I, H), gate rows first, and
``<layer>.mlp.experts.down_proj`` (E, H, I). On disk, transformers writes one key per
expert and projection (``<layer>.mlp.experts.<e>.gate_proj.weight`` ...). Reading fuses
those slices by copying each straight into a preallocated tensor; writing splits them
again, one shard at a time, so ``transformers.AutoModelForCausalLM.from_pretrained``
reads what we write. Only safetensors is read: pickled ``.bin`` checkpoints can run
code on load, so they are refused.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from livethinking.data.atomic import replace_directory, temporary_directory_for

__all__ = ["CheckpointError", "iter_tensors", "load_state_dict", "load_into", "save_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_KEY = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and key."""


def _shard_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of a checkpoint, and the index's key -> file map if it has one."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors files are read (pickled checkpoints are not)")
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        bad = [name for name in weight_map.values() if Path(name).name != name]
        if bad:
            raise CheckpointError(f"{index}: shard name {bad[0]!r} points outside the checkpoint directory")
        mapping = {key: path / name for key, name in weight_map.items()}
        files = sorted(set(mapping.values()))
        for f in files:
            if not f.is_file():
                keys = sorted(k for k, v in mapping.items() if v == f)
                raise CheckpointError(f"{f}: shard listed in {index} is missing (holds e.g. {keys[0]!r})")
        return files, mapping
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME], None
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: holds only pickled checkpoints (.bin/.pt); these are not read, "
                              "convert them to safetensors first")
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupted or truncated safetensors file ({e})") from e


def _plan(path: Path, expected_keys: Mapping[str, tuple[int, ...]] | None):
    """Read every shard's header: the files, the plain keys and the expert groups to fuse."""
    files, index = _shard_files(path)
    plain: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[tuple[int, str], tuple[Path, tuple[int, ...]]]] = {}
    for file in files:
        with _open(file) as f:
            keys = set(f.keys())
            for key in keys:
                shape = tuple(f.get_slice(key).get_shape())
                m = _EXPERT_KEY.match(key)
                if m and len(shape) != 2:
                    raise CheckpointError(f"{file}: expert weight {key!r} has shape {shape}, expected 2-D")
                if m:
                    experts.setdefault(m[1], {})[(int(m[2]), m[3])] = (file, shape)
                elif key in plain:
                    raise CheckpointError(f"{file}: key {key!r} also stored in {plain[key]}")
                else:
                    plain[key], shapes[key] = file, shape
        if index is not None:
            for key, listed in index.items():
                if listed == file and key not in keys:
                    raise CheckpointError(f"{file}: key {key!r} is listed in {INDEX_NAME} but absent from this shard")

    fused: dict[str, tuple[Path, int, int, int]] = {}   # prefix -> (a file, E, I, H)
    for prefix, slices in experts.items():
        for name in (f"{prefix}.gate_up_proj", f"{prefix}.down_proj"):
            if name in plain:
                raise CheckpointError(f"{plain[name]}: {name!r} is stored both fused and per expert")
        n = max(e for e, _ in slices) + 1
        if expected_keys is not None and f"{prefix}.gate_up_proj" in expected_keys:
            n = max(n, expected_keys[f"{prefix}.gate_up_proj"][0])
        file0, shape0 = next(iter(slices.values()))
        i_size, h_size = shape0[::-1] if all(p == "down_proj" for _, p in slices) else \
            next(shape for (_, p), (_, shape) in slices.items() if p != "down_proj")
        for e in range(n):
            for proj, want in (("gate_proj", (i_size, h_size)), ("up_proj", (i_size, h_size)),
                               ("down_proj", (h_size, i_size))):
                key = f"{prefix}.{e}.{proj}.weight"
                if (e, proj) not in slices:
                    raise CheckpointError(f"{path}: expert {e} of {prefix!r} is missing ({key!r} in no shard)")
                file, shape = slices[(e, proj)]
                if shape != want:
                    raise CheckpointError(f"{file}: {key!r} has shape {shape}, expected {want}")
        fused[prefix] = (file0, n, i_size, h_size)
        shapes[f"{prefix}.gate_up_proj"] = (n, 2 * i_size, h_size)
        shapes[f"{prefix}.down_proj"] = (n, h_size, i_size)

    if expected_keys is not None:
        where = dict(plain) | {f"{p}.{s}": v[0] for p, v in fused.items() for s in ("gate_up_proj", "down_proj")}
        for key, shape in shapes.items():
            if key not in expected_keys:
                raise CheckpointError(f"{where[key]}: unexpected key {key!r}")
            if tuple(expected_keys[key]) != shape:
                raise CheckpointError(f"{where[key]}: {key!r} has shape {shape}, expected {tuple(expected_keys[key])}")
        missing = sorted(set(expected_keys) - set(shapes))
        if missing:
            raise CheckpointError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return files, fused


def _cast(t: torch.Tensor, dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def iter_tensors(path, *, dtype=None, device="cpu", expected_keys=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` shard by shard under the in-memory (fused) names.

    A fused expert tensor is yielded as soon as its last slice has been copied in.
    All headers are checked first, so an error comes before any tensor is read.
    """
    path = Path(path)
    files, fused = _plan(path, expected_keys)
    buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    remaining = {prefix: 3 * n for prefix, (_, n, _, _) in fused.items()}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                m = _EXPERT_KEY.match(key)
                if m is None:
                    yield key, _cast(f.get_tensor(key), dtype, device)
                    continue
                prefix, e, proj = m[1], int(m[2]), m[3]
                _, n, i_size, h_size = fused[prefix]
                piece = f.get_tensor(key)
                if prefix not in buffers:
                    kind = dtype if dtype is not None else piece.dtype
                    buffers[prefix] = (torch.empty(n, 2 * i_size, h_size, dtype=kind, device=device),
                                       torch.empty(n, h_size, i_size, dtype=kind, device=device))
                gate_up, down = buffers[prefix]
                dest = {"gate_proj": gate_up[e, :i_size], "up_proj": gate_up[e, i_size:], "down_proj": down[e]}[proj]
                dest.copy_(piece)
                del piece
                remaining[prefix] -= 1
                if remaining[prefix] == 0:
                    del buffers[prefix]
                    yield f"{prefix}.gate_up_proj", gate_up
                    yield f"{prefix}.down_proj", down


def load_state_dict(path, *, dtype=None, device="cpu", expected_keys=None) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint (file, directory or sharded directory) into fused names.

    ``dtype`` casts floating-point tensors; ``expected_keys`` (name -> shape) makes
    unexpected keys, missing keys and shape mismatches errors.
    """
    return dict(iter_tensors(path, dtype=dtype, device=device, expected_keys=expected_keys))


def _aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """State-dict names grouped by the tensor object they hold (tied weights share one)."""
    groups: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {names[0]: names for names in groups.values()}


def _set(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        if not isinstance(tensor, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=owner._parameters[attr].requires_grad)
        owner._parameters[attr] = tensor
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise CheckpointError(f"{name!r} is neither a parameter nor a buffer of {type(owner).__name__}")


def load_into(module: torch.nn.Module, path, *, dtype=None, device="cpu") -> list[str]:
    """Fill a module (typically built under ``torch.device("meta")``) from a checkpoint.

    Tensors are assigned as they are read, so the weights exist once. Tied weights
    (e.g. ``lm_head.weight`` sharing ``model.embed_tokens.weight``, absent on disk)
    need only one name on disk and stay tied. Returns the names of non-persistent
    buffers still on the meta device (e.g. rotary tables), for the caller to rebuild.
    """
    groups = _aliases(module)
    shapes = {n: tuple(t.shape) for n, t in module.state_dict(keep_vars=True).items()}
    on_disk = set()
    files, _ = _shard_files(Path(path))
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                m = _EXPERT_KEY.match(key)
                on_disk.update((f"{m[1]}.gate_up_proj", f"{m[1]}.down_proj") if m else (key,))
    expected = {}
    for names in groups.values():
        present = [n for n in names if n in on_disk]
        for n in present or names[:1]:
            expected[n] = shapes[n]
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(path, dtype=dtype, device=device, expected_keys=expected):
        _set(module, name, tensor)
        loaded[name] = tensor
    for names in groups.values():
        source = next(n for n in names if n in loaded)
        for n in names:
            if n not in loaded:
                tied = module.get_parameter(source) if _is_param(module, source) else loaded[source]
                _set(module, n, tied)
    return [n for n, b in module.named_buffers() if b.is_meta]


def _is_param(module: torch.nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    return attr in module.get_submodule(owner_name)._parameters


def _disk_tensors(state_dict: Mapping[str, torch.Tensor], skip: set[str]):
    """``(disk key, nbytes, make)`` in order, with fused experts split per expert lazily."""
    for name, t in state_dict.items():
        if name in skip:
            continue
        m = _FUSED_KEY.match(name)
        if m is None:
            yield name, t.numel() * t.element_size(), (lambda t=t: t)
            continue
        prefix, kind = m[1], m[2]
        if kind == "gate_up_proj":
            i_size = t.shape[1] // 2
            for e in range(t.shape[0]):
                for proj, rows in (("gate_proj", slice(0, i_size)), ("up_proj", slice(i_size, None))):
                    piece = t[e, rows]
                    yield f"{prefix}.{e}.{proj}.weight", piece.numel() * piece.element_size(), (lambda p=piece: p)
        else:
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e].numel() * t.element_size(), (lambda p=t[e]: p)


def _write_weights(state_dict, directory: Path, skip: set[str], max_shard_bytes: int) -> None:
    shards: list[list] = [[]]
    size = 0
    for key, nbytes, make in _disk_tensors(state_dict, skip):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, make))
        size += nbytes
    total = sum(nbytes for _, nbytes, _ in _disk_tensors(state_dict, skip))
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors, seen = {}, set()
        for key, make in shard:
            t = make().detach().to("cpu")
            ptr = t.untyped_storage().data_ptr()
            # safetensors refuses views and tensors sharing storage: copy only those.
            if not t.is_contiguous() or ptr in seen or t.numel() != t.untyped_storage().nbytes() // t.element_size():
                t = t.clone(memory_format=torch.contiguous_format)
            seen.add(t.untyped_storage().data_ptr())
            tensors[key] = t
            weight_map[key] = name
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping, path, *,
                    tokenizer=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a checkpoint transformers can load: per-expert safetensors keys, ``config.json``
    and the tokenizer. The directory appears whole or not at all, and durably: it is written
    next to ``path`` as ``.{name}.tmp-*``, fsynced and swapped into place by
    `livethinking.data.atomic.replace_directory` (an old one is replaced, never missing)."""
    path = Path(path).resolve()
    skip = {"lm_head.weight"} if config_dict.get("tie_word_embeddings", False) else set()
    tmp = temporary_directory_for(path)
    try:
        _write_weights(state_dict, tmp, skip, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
