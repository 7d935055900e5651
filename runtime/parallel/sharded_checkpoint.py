"""Checkpoints of sharded (FSDP2) runs, and their final model as a Hugging Face directory.

Called by io/checkpoint.py when the run is sharded (``parallel=fsdp2``):

``save(run)``: every process writes its shards of the trained model and of the optimizer
state with ``torch.distributed.checkpoint`` (``dcp.save``; no process ever holds the whole
state) into ``OUT/.checkpoint.tmp-sharded/sharded``; the main process adds the scheduler state
(``scheduler.pt``), each process's generator states (``process_<rank>.json``) and, last,
``state.json`` (with the settings a resume must share, and ``"sharded": true``), then renames
the directory into ``OUT/checkpoint`` as unsharded checkpoints are (io/checkpoint.py
``replace_dir``, keeping ``save_total_limit``'s ``OUT/checkpoint-<step>``; io/outdir.py
recovers a save a kill cut short). The directory must be one
that every process sees (one machine, or a file system the nodes share).

``load(run)``: ``dcp.load`` into the run's sharded model and optimizer (their state dicts from
``torch.distributed.checkpoint.state_dict``, so the optimizer state is keyed by parameter
names), then the scheduler, the generators and the run's position: ``--resume`` continues
exactly where the checkpoint was written.

``save_final(run)``: the trained LM gathered (each shard once, to the main process's CPU) and
written with ``save_pretrained``: ``OUT/model`` loads with ``AutoModelForCausalLM.from_pretrained``
like the model of an unsharded run.

Nothing from the run folder is unpickled. DCP writes its tensors with ``torch.save`` into
``*.distcp`` files and its index, ``sharded/.metadata``, with plain ``pickle.dump`` of a
``torch.distributed.checkpoint.metadata.Metadata`` dataclass (tensor names, sizes, dtypes,
chunk offsets, and which file and byte range holds each chunk); its own reader loads that
index with ``pickle.load`` and non-tensor values with ``torch.load(weights_only=False)``.
:class:`SafeReader` therefore reads ``.metadata`` through an unpickler that builds only those
metadata classes (``torch.Size``, dtypes, layouts, paths; anything else is refused), and
:class:`SafePlanner` loads non-tensor values (the optimizer's hyper-parameters) with
``torch.load(weights_only=True)``; tensors are read by DCP with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import torch

from ..errors import RunError
from ..models.loaders import PolicyWithValueHead, unwrap_causal_lm
from .fsdp2 import full_state_dict

# (module, name) that DCP's .metadata may name; anything else makes the checkpoint refused
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorProperties", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name (torch.strided)
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and plain values only."""

    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader, with its ``.metadata`` read by :class:`_MetadataUnpickler`."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            meta = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(meta, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise RunError(f"{meta}: refused to load ({e})",
                               hint="a checkpoint holds only tensors and plain values; this file is damaged "
                                    "or was not written by alignspec. Start afresh or restore the file") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """DCP's load planner, with non-tensor values loaded ``weights_only=True``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def _state_dicts(run):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(run.wrapped, run.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(run) -> None:
    """``OUT/checkpoint`` of a sharded run (see the module docstring); every process calls it."""
    import torch.distributed.checkpoint as dcp

    from ..io.checkpoint import replace_dir
    run._barrier()
    states = run._gather_objects(run._process_state())  # plain JSON values, in rank order
    out = run.out
    tmp = out / ".checkpoint.tmp-sharded"  # one name on every process
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    run._barrier()
    dcp.save(_state_dicts(run), checkpoint_id=str(tmp / "sharded"))
    if run.main:
        torch.save({"scheduler": run.scheduler.state_dict()}, tmp / "scheduler.pt")
        for rank, st in enumerate(states):
            (tmp / f"process_{rank}.json").write_text(json.dumps(st))
        (tmp / "state.json").write_text(json.dumps({**run.family.checkpoint_state(run), "settings": run._settings(),
                                                    "sharded": True}))
    run._barrier()
    if run.main:  # save_total_limit: the replaced one kept as OUT/checkpoint-<step> (io/checkpoint.py)
        replace_dir(tmp, out / "checkpoint", out / ".checkpoint.old", run._kept_name())
        run._prune_checkpoints()
    run._barrier()


def load(run, ck: Path) -> None:
    """Restore the sharded checkpoint ``ck`` (its ``state.json`` already checked by
    io/checkpoint.py) into the run's model, optimizer, scheduler and generators."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from ..io.checkpoint import load_tensors
    sd = _state_dicts(run)
    try:
        dcp.load(sd, storage_reader=_reader(ck / "sharded"), planner=_planner())
    except RunError:
        raise
    except Exception as e:  # a missing or truncated shard, another model or world size
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{ck}: cannot load the sharded checkpoint ({first[:300]})",
                       hint="resume with the model, settings and number of processes the run started with, "
                            "or start afresh") from None
    set_state_dict(run.wrapped, run.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    sched = load_tensors(ck / "scheduler.pt")
    try:
        run.scheduler.load_state_dict(sched["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # wrong types: a damaged file
        raise RunError(f"{ck / 'scheduler.pt'} is damaged ({type(e).__name__}: {e})",
                       hint="start afresh (without --resume) or use another --out") from None


def save_final(run) -> None:
    """``OUT/model``: the LM gathered from its shards, as a Hugging Face directory (+ tokenizer,
    and ``value_head.safetensors`` for a critic); every process calls it, the main one writes."""
    lm = unwrap_causal_lm(run.model)
    lm_sd = full_state_dict(lm)
    head_sd = full_state_dict(run.model.value_head) if isinstance(run.model, PolicyWithValueHead) else None
    if not run.main:
        return

    def write(tmp: Path) -> None:
        lm.save_pretrained(tmp, state_dict=lm_sd, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        if head_sd is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in head_sd.items()}, str(tmp / "value_head.safetensors"))
        from ..io.model_card import write_model_card
        write_model_card(run, tmp)  # README.md: spec, base model, data, settings, last metrics
    run._save_dir("model", write)
