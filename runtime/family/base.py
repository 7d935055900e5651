"""The policy-family protocol: what the one loop (loop/) calls on a family, each hook with its
one caller. ``TokenPolicy`` (token_policy.py) and ``FlowPolicyFamily`` (flow_policy.py)
implement it; the defaults here are the "nothing to do" of a family that has nothing there.

``setup`` returns the run's state (state.py); every other hook takes ``run``, the Engine,
which shows the state's fields read-only (``run.device``), the loop's own attributes
(``run.current``: this iteration's algorithm; ``run.batch_rows``: the rollout's rows;
``run.step``) and ``run.say``. What is fixed after setup is a state field, not a hook:
``run_line``, ``evaluates``, ``bar_metrics``, ``curve_metrics``, ``cuda_rng``.

A *row set* is what a family's sampler output becomes (token rows: a list of dicts; flow
trajectories: a ``FlowRollout``); the loop only passes it back to the family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .state import RunState


class PolicyFamily:
    """The hooks of a policy family (see the module docstring)."""

    name = ""   # "token" | "flow": named in the checkpoint check (loop/engine.py)

    # -- setup (Engine.__init__) ---------------------------------------------------------------
    def setup(self, algo, cfg, *, out: Path, console, parallel_plan) -> RunState:
        """Build the run (models, data, scorers, optimizer, schedule) and return it."""
        raise NotImplementedError

    # -- rows (loop/rollout_stage.py; the samplers through Engine.tok_prompt / tok_completion) ----
    def next_prompts(self, run):
        """This process's prompts of the next rollout round (records, or a count of class prompts)."""
        raise NotImplementedError

    def rows(self, sampled):
        """The row set of a sampler's output."""
        raise NotImplementedError

    def batch_of(self, run, rows) -> dict:
        """The tensors of a row set (the step functions' batch)."""
        raise NotImplementedError

    def score_rows(self, run, rows, batch: dict) -> None:
        """Add the external scores of ``rows`` (rewards, scorer models, embeddings) to ``batch``."""
        raise NotImplementedError

    def select_rows(self, rows, idx: list[int]):
        """The rows ``idx`` of a row set, in that order."""
        raise NotImplementedError

    def cat_rows(self, parts: list):
        """One row set of ``parts``, in order."""
        raise NotImplementedError

    def rollout_info(self, run, rows, info: dict) -> None:
        """Add what the step record shows of the kept rows to ``info``."""

    def tok_prompt(self, run, prompt) -> list[int]:
        raise NotImplementedError(f"the {self.name} family has no token prompts")

    def tok_completion(self, run, text: str) -> list[int]:
        raise NotImplementedError(f"the {self.name} family has no token completions")

    # -- forwards (loop/engine.py, loop/update.py) ----------------------------------------------
    def no_grad_forwards(self, run, batch: dict) -> None:
        """Add the no-grad quantities the spec reads (``logp_old``, ``logp_ref``, ``value``...)."""

    def forward(self, run, mb: dict, sl: slice, rows) -> dict:
        """The training forward (with grad) of a micro-batch: rows ``sl`` of the minibatch ``mb``
        (``rows``: their indices in the step's batch)."""
        raise NotImplementedError

    def zero_loss(self, run, fw: dict | None = None) -> torch.Tensor:
        """A loss of zero that still joins the gradient reduction of several processes: of the
        forward outputs ``fw`` (a micro-batch dropped for a non-finite term), or, without ``fw``,
        of a one-row padding forward (a process with no more rows)."""
        raise NotImplementedError

    # -- the run (loop/engine.py, loop/base.py) ---------------------------------------------------
    def rollout_metrics(self, run, batch: dict) -> dict:
        """The step's metrics of the rollout (rewards, lengths), after the advantage."""
        return {}

    def step_extra(self, run) -> dict | None:
        """More of the step's record (a sampler's statistics), or None."""
        return None

    def evaluate(self, run) -> float | None:
        """The held-out score (with ``state.evaluates``)."""
        return None

    def before_steps(self, run) -> None:
        """After the step-0 evaluation, before the clock starts."""

    # -- checkpoints (io/checkpoint.py, parallel/sharded_checkpoint.py) -------------------------
    def save_weights(self, run, folder: Path, final: bool = False) -> None:
        """A checkpoint's model files in ``folder``; with ``final``, the final model instead."""
        raise NotImplementedError

    def load_weights(self, run, folder: Path) -> None:
        """Load a checkpoint's model files back (from ``save_weights``)."""
        raise NotImplementedError

    def checkpoint_state(self, run) -> dict:
        """``state.json`` besides the settings: step, cursor, spec (and ``family`` when not "token")."""
        raise NotImplementedError

    def process_state(self, run, restore: dict | None = None) -> dict:
        """A process's own state beyond the generators (JSON values); with ``restore`` (a
        checkpoint's), put it back first."""
        return {}
