"""``generate(prompt, n, temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, model)``:
n samples per prompt from an LM; the run's ``stop`` strings end a completion."""

from __future__ import annotations

from .base import Sampler, register


@register("generate")
class Generate(Sampler):
    """Samples from the policy (with self-play iterations: the frozen iterate pi_t,
    models/iterations.py), or from the reference with ``model = reference`` (with LoRA and no
    separate reference: the policy with its adapters disabled)."""

    def sample(self, recs, seed):
        from . import generation  # looked up at each call (tests wrap generate_groups)
        run = self.run
        model, ctx = self.sampling_model(run.policy if getattr(run, "iterate", None) is None else run.iterate)
        from ..parallel.wrap import gathered
        with ctx, gathered(run, model):  # whole weights for generation under FSDP2
            ro = generation.generate_groups(
                model, run.tokenizer, [r["prompt"] for r in recs], int(self.option("n")),
                max_new_tokens=int(self.option("max_tokens", run.max_new_tokens)),
                temperature=float(self.option("temperature")), top_p=float(self.option("top_p")),
                generator_seed=seed, fast=run.cfg.fast_sampling, prompt_format=run.prompt_format,
                sampler_logprobs="logp_sampler" in run.current.inputs, top_k=int(self.option("top_k", 0)),
                min_p=float(self.option("min_p", 0.0)), repetition_penalty=float(self.option("repetition_penalty", 1.0)),
                stop=tuple(run.cfg.stop))
        groups = [[] for _ in recs]
        pm, cm = ro.prompt_mask.cpu(), ro.completion_mask.cpu()
        for i in range(ro.completion_ids.shape[0]):
            gi = int(ro.prompt_index[i])
            row = {"p": ro.prompt_ids[i].cpu()[pm[i].bool()].tolist(),
                   "c": ro.completion_ids[i].cpu()[cm[i].bool()].tolist(), "text": ro.texts[i], "rec": recs[gi]}
            if ro.sampler_logprobs is not None:  # logp_sampler: as the sampler drew each token
                row["ls"] = ro.sampler_logprobs[i].cpu()[cm[i].bool()].tolist()
            groups[gi].append(row)
        return groups
