"""A weight-transfer engine for vLLM servers that works on CPUs: safetensors files in shared memory.

vLLM's own transfer engines (NCCL, CUDA IPC) need GPUs. This one, ``alignspec_shm``, is
registered with vLLM's ``WeightTransferEngineFactory`` by a vLLM plugin (the entry point
``vllm.general_plugins: alignspec = alignspec.runtime.rollout.vllm_transfer:register`` in
pyproject.toml, loaded by every vLLM process), and a server started by ``alignspec vllm-serve``
selects it with ``--weight-transfer-config '{"backend": "alignspec_shm"}'``. The update goes
through vLLM's own endpoints and lifecycle:

    POST /pause                  in-flight requests finish or wait (mode=keep)
    POST /start_weight_update    layerwise reload set up (vLLM's reload machinery)
    POST /update_weights         {"update_info": {"path": FILE}}: one chunk (a few layers) of
                                 checkpoint-format tensors written by the trainer to FILE
                                 (a safetensors file under /dev/shm); loaded through the
                                 model's ``load_weights`` and processed (CPU prepacking) in place
    POST /finish_weight_update   layerwise reload finalized; the weight version set
    POST /resume

The trainer deletes each chunk's file after the server answers. Server and trainer must share
the file system (one machine); across machines, GPUs use vLLM's NCCL engine instead.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND = "alignspec_shm"


CHUNK_BYTES = 256 << 20


def send_in_chunks(weights, send, directory: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write ``weights`` (``(name, tensor)``, consumed one at a time) as safetensors files of whole
    layers (about ``chunk_bytes`` each) in ``directory`` (default ``/dev/shm`` where writable) and
    call ``send(path)`` for each (the engine loads it), deleting the file after; the chunks sent."""
    import os
    import tempfile
    from safetensors.torch import save_file
    if directory is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        directory = "/dev/shm"
    chunk, size, k = {}, 0, 0

    def flush():
        nonlocal chunk, size, k
        if not chunk:
            return
        fd, path = tempfile.mkstemp(prefix=f"alignspec-weights-{os.getpid()}-{k}-", suffix=".safetensors",
                                    dir=directory)
        os.close(fd)
        try:
            save_file(chunk, path)
            send(path)
        finally:
            os.unlink(path)
        chunk, size, k = {}, 0, k + 1

    for name, t in weights:  # a chunk is flushed between layers only
        if size >= chunk_bytes and _layer(name) != _layer(next(reversed(chunk))):
            flush()
        chunk[name] = t.detach().to("cpu").contiguous().clone()
        size += t.numel() * t.element_size()
    flush()
    return k


def _layer(name: str) -> str:
    parts = name.split(".")
    return next((".".join(parts[:i + 1]) for i, p in enumerate(parts) if p.isdigit()), "")


def register() -> None:
    """vLLM plugin entry point: register the ``alignspec_shm`` engine (idempotent)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:
        return
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "SharedFileWeightTransferEngine")


def _engine_class():
    import torch
    from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                       WeightTransferUpdateInfo)

    @dataclass
    class InitInfo(WeightTransferInitInfo):
        pass

    @dataclass
    class UpdateInfo(WeightTransferUpdateInfo):
        path: str = ""

    class SharedFileWeightTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
        """Checkpoint-format tensors from safetensors files the trainer wrote (module docstring)."""

        init_info_cls = InitInfo
        update_info_cls = UpdateInfo

        def init_transfer_engine(self, init_info) -> None:
            pass

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info) -> None:
            self.receive_weights(self.parse_update_info(update_info))
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def receive_weights(self, update_info) -> None:
            from safetensors.torch import load_file
            weights = load_file(update_info.path, device="cpu")
            with torch.device(self.device):
                self.model.load_weights(list(weights.items()))

        def shutdown(self) -> None:
            pass

    return SharedFileWeightTransferEngine


def __getattr__(name):
    if name == "SharedFileWeightTransferEngine":  # built on first use: vLLM is imported only by its processes
        cls = _engine_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
