"""Checkpoints of block-parallel runs, in torch.distributed.checkpoint (DCP) format.

A checkpoint is a directory: DCP's files (one `.distcp` per writing rank and a `.metadata` index)
plus `noprop.json` (format tag, config, epoch, history, data description, the world that wrote it).
Every tensor is stored under its own name, never under a position in one rank's optimizer:

- `model.<name>`: the model's state_dict entries. Block rank r of replica 0 writes its own blocks
  (`model.blocks.<t-1>.*`), rank 0 writes the shared ones (head, embedding) once;
- `optim.<parameter name>.<key>`: AdamW's state of that parameter (`step`, `exp_avg`,
  `exp_avg_sq`), written by whichever rank owns the parameter (rank 0 for the shared ones);
- `rng`: rank 0's CPU generator state (the per-step noise seeds are drawn there and broadcast).

So the keys are per block: a run of any world size (any W and --dp, or one process without a
process group) loads every block's weights, and each rank the optimizer state of the blocks it owns
then. Loading needs no process group (`load_model`: `noprop eval DIR`); DCP's own
`python -m torch.distributed.checkpoint.format_utils dcp_to_torch_save DIR out.pt` gives one
torch.save'd dict of the same names.

Writes are atomic per directory: all ranks write `DIR.partial`, then rank 0 swaps it in (the old
checkpoint becomes `DIR.old` until the swap is done, and is used if a crash fell in between).
DCP's index is read by an unpickler that builds only DCP's metadata classes, torch dtypes and
sizes and paths; the tensors themselves are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from noprop import checkpoint as ckpt
from noprop.atomic import write_text_atomically
from noprop.training.build import build_model
from noprop.training.config import TrainConfig

FORMAT = "noprop-dcp-v1"
META = "noprop.json"
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP index")


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader, with its `.metadata` index unpickled by an allow-list."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / (".metadata" if kwargs.get("rank") is None else f"__{kwargs['rank']}.metadata")
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_distributed_checkpoint(path) -> bool:
    """Whether `path` is (or, after an interrupted swap, left behind) a checkpoint of this format."""
    return path is not None and (_existing(Path(path)) / META).is_file()


def _existing(path: Path) -> Path:
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.is_dir() else path


def read_meta(path) -> dict:
    path = _existing(Path(path))
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{path} is not a distributed noprop checkpoint (no {META} in it)") from None
    except (OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{path / META} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a distributed noprop checkpoint (expected format {FORMAT!r})")
    return meta


def _param_names(model) -> dict:
    return {p: n for n, p in model.named_parameters()}


def _written_by(model, opts, layout) -> dict:
    """The tensors this rank writes (see the module docstring)."""
    out = {}
    names = _param_names(model)
    mine = set()
    if layout.dp_rank == 0:
        for t in layout.owned:
            prefix = f"blocks.{t - 1}."
            out.update({f"model.{prefix}{k}": v for k, v in model.blocks[t - 1].state_dict().items()})
            mine |= {p for p in model.blocks[t - 1].parameters()}
    if layout.rank == 0:
        out.update({f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("blocks.")})
        mine |= set(model.shared_parameters())
        out["rng"] = torch.get_rng_state()
    for opt in opts.all():
        for p, state in opt.state.items():
            if p in mine:
                out.update({f"optim.{names[p]}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def save(path, model, opts, layout, comm, meta: dict) -> Path:
    """Every rank writes its part into PATH.partial; rank 0 adds noprop.json and swaps it in."""
    path = Path(path)
    partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    if layout.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    comm.barrier("preparing the checkpoint folder")
    state = _written_by(model, opts, layout)
    comm.run("saving the checkpoint", lambda: _quietly(dcp.save, state, storage_writer=FileSystemWriter(partial)))
    if layout.rank == 0:
        write_text_atomically(partial / META, json.dumps({"format": FORMAT, **meta}, default=str))
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    comm.barrier("finishing the checkpoint")
    return path


def _quietly(fn, *args, **kwargs):
    """DCP warns that it assumes one process whenever no process group is initialised: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kwargs)


def _index(path: Path) -> dict:
    try:
        return SafeReader(path).read_metadata().state_dict_metadata
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: its DCP index .metadata is missing or unreadable "
                                   f"({type(exc).__name__}: {exc})") from None


def _load(path: Path, state: dict) -> None:
    try:
        _quietly(dcp.load, state, storage_reader=SafeReader(path), no_dist=True)
    except Exception as exc:  # DCP wraps a reader's failures in CheckpointException
        text = str(exc).strip().splitlines()
        raise ckpt.CheckpointError(f"checkpoint {path} could not be read ({text[0] if text else type(exc).__name__})")


def load_model_state(path, model) -> None:
    """Load every model tensor of the checkpoint into `model` (in place); CheckpointError if a name
    is missing or a shape differs."""
    path = _existing(Path(path))
    index = _index(path)
    wanted = {f"model.{k}": v for k, v in model.state_dict().items()}
    missing = sorted(k[len("model."):] for k in wanted if k not in index)
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: it has no {missing[0]}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, v in wanted.items():
        if tuple(index[k].size) != tuple(v.shape):
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: {k[len('model.'):]} has shape "
                                       f"{list(index[k].size)} there, {list(v.shape)} here")
    _load(path, wanted)  # the templates are the model's own tensors: loaded in place


def load_training_state(path, model, opts) -> None:
    """Resume: the whole model, the optimizer state of every parameter `opts` steps (by name), and
    the CPU generator state rank 0 had."""
    path = _existing(Path(path))
    load_model_state(path, model)
    index = _index(path)
    names = _param_names(model)
    templates, owners = {}, {}
    for opt in opts.all():
        on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
        for group in opt.param_groups:
            for p in group["params"]:
                prefix = f"optim.{names[p]}."
                for key in (k for k in index if k.startswith(prefix)):
                    md = index[key]
                    where = p.device if (on_device or key != prefix + "step") else "cpu"
                    templates[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype, device=where)
                    owners[key] = (opt, p, key[len(prefix):])
    if "rng" in index:
        templates["rng"] = torch.empty(tuple(index["rng"].size), dtype=torch.uint8)
    _load(path, templates)
    for key, (opt, p, name) in owners.items():
        opt.state[p][name] = templates[key]
    if "rng" in templates:
        torch.set_rng_state(templates["rng"])


def load_model(path, device="cpu"):
    """(model, config, meta) from a distributed checkpoint, in this one process: what `noprop eval`
    and `noprop.training.load_model` do with a checkpoint directory."""
    meta = read_meta(path)
    try:
        cfg = TrainConfig.from_dict(meta["config"])
        data = meta["data"]
        model = build_model(cfg, tuple(data["image_shape"]), data["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path} does not describe a model noprop can rebuild ({exc})") from None
    load_model_state(path, model)
    return model.to(device), cfg, meta
