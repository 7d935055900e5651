"""The flow-matching policy family: Flow-GRPO's SDE sampler and per-step Gaussian policy.

Source: Liu et al., "Flow-GRPO", arXiv:2505.05470, Sec. 4, and the official code
(yifan123/flow_grpo), as summarised in the reference notes (algorithms.md §8). Everything
here follows the rectified-flow convention of SD3:

    x_t = (1 - t) x_0 + t eps,    t = 1 is noise, t = 0 is data,
    the network predicts the velocity v_theta(x_t, t, c) ~ eps - x_0.

Pieces
------
- ``VelocityNet``: a small MLP v_theta(x, t, c) (time embedding + class embedding; the
  "prompt" is a class id).
- ``FlowTask``: the built-in 2-D task (per-class mixture of Gaussian blobs, a reward that
  is high on one blob of each class only) and its evaluation.
- ``pretrain``: rectified-flow matching, returns a state dict (the caller caches it).
- ``sde_sigma`` / ``sde_step`` / ``step_logprob`` / ``rollout``: the ODE -> SDE sampler of
  Flow-GRPO with its exact per-step Gaussian log-density (mean over latent elements).
- ``FlowPolicy``: recomputes, with gradients, the per-step log-probs of stored
  trajectories and the squared distance of the step means to a frozen reference.

What a compiled ``flow_grpo`` spec reads, and where it comes from here:
``logp`` [B, T] (``FlowPolicy.logprobs``, grad), ``logp_old`` [B, T] (``rollout``, no grad),
``mu_sqdist_ref`` [B, T] (``FlowPolicy.logprobs`` with a reference, grad), ``step_std``
[B, T] = sigma_t of each step (the code divides the KL by sigma_t^2, without |dt|),
``mask`` [B, T] (ones), ``reward`` [B] (``FlowTask.reward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------


class VelocityNet(nn.Module):
    """v_theta(x, t, c): an MLP on [x, time features, class embedding].

    The time features are ``[sin(2 pi f_k t), cos(2 pi f_k t)]`` for ``time_freqs``
    log-spaced frequencies f_k in [1, 16], followed by a linear layer; the class id is
    embedded by ``nn.Embedding(num_classes, hidden)``. Three hidden SiLU layers of width
    ``hidden``. ``t`` may be a float, a 0-dim tensor or a ``[B]`` tensor.
    """

    def __init__(self, dim: int = 2, num_classes: int = 4, hidden: int = 128, time_freqs: int = 16):
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.register_buffer("freqs", torch.logspace(0, math.log10(16.0), time_freqs), persistent=False)
        self.time = nn.Sequential(nn.Linear(2 * time_freqs, hidden), nn.SiLU())
        self.cls = nn.Embedding(num_classes, hidden)
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, t, c: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        ang = 2 * math.pi * t[:, None] * self.freqs.to(x.dtype)[None, :]
        temb = self.time(torch.cat([ang.sin(), ang.cos()], dim=-1))
        return self.net(torch.cat([x, temb, self.cls(c)], dim=-1))


# ---------------------------------------------------------------------------------------
# task
# ---------------------------------------------------------------------------------------


class FlowTask:
    """The built-in 2-D task: class-conditional blob mixtures and a one-blob reward.

    Class c's data is an equal mixture of ``k`` isotropic Gaussian blobs (std ``blob_std``)
    whose centres sit on a circle of radius ``radius`` at angles
    ``2 pi j / k + c * pi / (2 k)`` (j = 0..k-1), so every class has its own layout.
    Blob j = 0 of each class is the *target*; the reward is

        r(x, c) = exp( -|| x - target_c ||^2 / (2 s^2) ),    s = ``reward_width``,

    in (0, 1]. A sample of the target blob scores about s^2 / (s^2 + blob_std^2) (0.92 with
    the defaults), the other blobs about 0, so a model that fits the data scores about
    0.92 / k (0.31 for k = 3) and a model that puts all its mass on the target blob about
    0.92. ``eval_score`` is the mean reward, in [0, 1], higher is better; ``evaluate``
    draws the samples with the deterministic ODE sampler from a fixed noise seed on the fixed
    ``eval_classes``.
    """

    def __init__(self, num_classes: int = 4, k: int = 3, radius: float = 1.5,
                 blob_std: float = 0.1, reward_width: float = 0.35, dim: int = 2):
        if dim != 2:
            raise ValueError("FlowTask is 2-D")
        self.num_classes, self.k, self.dim = num_classes, k, dim
        self.radius, self.blob_std, self.reward_width = radius, blob_std, reward_width
        j = torch.arange(k, dtype=torch.float64)
        c = torch.arange(num_classes, dtype=torch.float64)
        ang = 2 * math.pi * j[None, :] / k + c[:, None] * math.pi / (2 * k)
        self.centers = (radius * torch.stack([ang.cos(), ang.sin()], dim=-1)).float()  # [C, k, 2]
        self.targets = self.centers[:, 0]  # [C, 2]

    def sample_data(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ p_data(. | c): a uniformly chosen blob of the class, plus blob_std noise."""
        j = torch.randint(0, self.k, classes.shape, generator=generator)
        noise = torch.randn(*classes.shape, self.dim, generator=generator)
        return self.centers[classes, j] + self.blob_std * noise

    def reward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """r(x, c) = exp(-||x - target_c||^2 / (2 s^2)), shape [B]."""
        d2 = (x - self.targets.to(x)[classes]).pow(2).sum(-1)
        return torch.exp(-d2 / (2 * self.reward_width ** 2))

    def eval_classes(self, per_class: int = 128) -> torch.Tensor:
        """The fixed evaluation classes: each class ``per_class`` times, class-major."""
        return torch.arange(self.num_classes).repeat_interleave(per_class)

    def eval_score(self, samples: torch.Tensor, classes: torch.Tensor) -> float:
        """Mean reward of ``samples`` for ``classes``, in [0, 1]; higher is better."""
        return float(self.reward(samples, classes).mean())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, steps: int = 20, per_class: int = 128, seed: int = 0) -> float:
        """eval_score of deterministic ODE samples (Euler, ``steps``) from a fixed noise seed."""
        classes = self.eval_classes(per_class)
        x = ode_sample(model, classes, steps, generator=torch.Generator().manual_seed(seed))
        return self.eval_score(x, classes)

    def nearest_blob_distance(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Distance of each sample to the nearest blob centre of its class, [B]."""
        return (x[:, None, :] - self.centers.to(x)[classes]).norm(dim=-1).min(dim=-1).values


# ---------------------------------------------------------------------------------------
# pretraining: rectified flow matching
# ---------------------------------------------------------------------------------------


def pretrain(model: VelocityNet, task: FlowTask, steps: int = 2000, seed: int = 0,
             batch: int = 256, lr: float = 3e-3) -> dict:
    """Rectified-flow matching (SD3 convention); returns a copy of the trained state dict.

        t ~ U(0, 1),  x_0 ~ p_data(. | c),  eps ~ N(0, I),
        x_t = (1 - t) x_0 + t eps,          target velocity  v = eps - x_0,
        loss = || v_theta(x_t, t, c) - (eps - x_0) ||^2  (mean).

    Adam with a cosine decay of the learning rate to 0. Data, t and eps come from a
    generator seeded with ``seed`` (the model's initialization is the caller's).
    The result depends only on (model init, task, steps, seed, batch, lr): cache it.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    for _ in range(steps):
        c = torch.randint(0, task.num_classes, (batch,), generator=g)
        x0 = task.sample_data(c, generator=g)
        eps = torch.randn(batch, task.dim, generator=g)
        t = torch.rand(batch, generator=g)
        xt = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = (model(xt, t, c) - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------


def time_grid(steps: int) -> torch.Tensor:
    """The sampling grid t_0 = 1 > t_1 > ... > t_steps = 0 (uniform), [steps + 1]."""
    return torch.linspace(1.0, 0.0, steps + 1)


@torch.no_grad()
def ode_sample(model: nn.Module, classes: torch.Tensor, steps: int = 20,
               generator: torch.Generator | None = None, x1: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic Euler solve of dx = v_theta dt from t = 1 (x_1 ~ N(0, I)) to t = 0."""
    ts = time_grid(steps)
    x = x1 if x1 is not None else torch.randn(classes.shape[0], model.dim, generator=generator)
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x = x + model(x, t, classes) * (t_next - t)
    return x


def sde_sigma(t: float, t_next: float, noise: float) -> float:
    """sigma_t = a * sqrt(t / (1 - t)), a = ``noise``.

    At t = 1 the code replaces the denominator 1 - t by 1 - t_grid[1], i.e. 1 - t_next of
    the first step (flow_grpo's ``sde_step_with_logprob``: ``torch.where(sigma == 1,
    sigma_max, sigma)`` with ``sigma_max = sigmas[1]``).
    """
    t, t_next = float(t), float(t_next)
    denom = 1.0 - (t_next if t >= 1.0 else t)
    return noise * math.sqrt(t / denom)


def sde_mean_std(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, noise: float):
    """Euler–Maruyama step of the Flow-GRPO SDE (paper Sec. 4.1; algorithms.md §8.2–8.3).

        dx = [ v + sigma_t^2 / (2 t) (x + (1 - t) v) ] dt + sigma_t dw,     dt = t_next - t < 0
        mu  = x + [ v + sigma_t^2 / (2 t) (x + (1 - t) v) ] dt
        std = sigma_t * sqrt(|dt|)

    Returns ``(mu, std, sigma_t)`` with ``std`` and ``sigma_t`` Python floats.
    """
    t, t_next = float(t), float(t_next)
    dt = t_next - t
    sigma = sde_sigma(t, t_next, noise)
    mu = x + (v + sigma ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mu, sigma * math.sqrt(abs(dt)), sigma


def sde_step(model: nn.Module, x: torch.Tensor, t: float, t_next: float, c: torch.Tensor,
             noise: float = 0.7, *, generator: torch.Generator | None = None,
             eps: torch.Tensor | None = None):
    """One SDE step x_t -> x_{t_next} = mu_theta(x_t) + sigma_t sqrt(|dt|) eps.

    ``noise`` is the noise level a; ``eps`` (standard normal, shape of x) is drawn from
    ``generator`` unless given. Returns ``(x_next, mu, std)`` with std = sigma_t sqrt(|dt|)
    (a float). ``x_next`` is detached (the sampled action); ``mu`` carries the model's graph
    when called with gradients enabled.
    """
    v = model(x, t, c)
    mu, std, _ = sde_mean_std(x, v, t, t_next, noise)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    x_next = (mu + std * eps).detach()
    return x_next, mu, std


def step_logprob(x_next: torch.Tensor, mu: torch.Tensor, std) -> torch.Tensor:
    """log N(x_next; mu, std^2 I), averaged (not summed) over the last (latent) dimension.

        log p = mean_d [ -(x_next - mu)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

    The per-element mean is the flow_grpo code's convention (algorithms.md §8.3); ``std``
    is a float or broadcasts against ``mu[..., 0]`` (e.g. [B, T] for mu [B, T, D]).
    """
    std = torch.as_tensor(std, dtype=mu.dtype, device=mu.device)
    if std.dim() > 0:
        std = std[..., None]
    lp = -(x_next - mu) ** 2 / (2 * std ** 2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(-1)


@dataclass
class FlowRollout:
    """Trajectories of the SDE sampler, B = len(prompt classes) * n rows (contiguous groups).

    traj      [B, T+1, D]  x at t_0 = 1 (noise) ... t_T = 0 (sample)
    classes   [B]          the class ("prompt") of each row, each repeated n times
    logp_old  [B, T]       per-step log-prob under the sampling model (no grad; None when
                           the rollout was drawn with ``with_logp_old=False``)
    step_std  [B, T]       sigma_t of each step (what the spec's KL divides by)
    trans_std [B, T]       sigma_t sqrt(|dt|): the std of the step's Gaussian
    mask      [B, T]       ones (every step is trained)
    samples   [B, D]       traj[:, -1]
    times     [T+1]        the time grid
    noise     float        the noise level a
    """

    traj: torch.Tensor
    classes: torch.Tensor
    logp_old: torch.Tensor | None
    step_std: torch.Tensor
    trans_std: torch.Tensor
    mask: torch.Tensor
    samples: torch.Tensor
    times: torch.Tensor
    noise: float

    @property
    def steps(self) -> int:
        return self.traj.shape[1] - 1

    def __len__(self) -> int:
        return self.traj.shape[0]

    def select(self, rows: torch.Tensor) -> "FlowRollout":
        """The rollout restricted to ``rows`` (e.g. the rows a spec's filter kept)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[rows] if f.name not in ("times", "noise") and v is not None else v
        return FlowRollout(**out)

    def batch(self) -> dict:
        """The per-row tensors a flow spec reads from the rollout: mask, logp_old, step_std."""
        out = {"mask": self.mask, "step_std": self.step_std}
        if self.logp_old is not None:
            out["logp_old"] = self.logp_old
        return out


@torch.no_grad()
def rollout(model: nn.Module, classes: torch.Tensor, n: int, steps: int = 10, noise: float = 0.7,
            generator: torch.Generator | None = None, with_logp_old: bool = True) -> FlowRollout:
    """Sample n trajectories per class with the SDE sampler (x_1 ~ N(0, I), T = ``steps``).

    ``logp_old`` is then recomputed from the stored trajectory by the same batched
    computation ``FlowPolicy.logprobs`` uses, so that right after a rollout, before any
    update, ``logp == logp_old`` exactly (ratio 1; the code README's on-policy check).
    With ``with_logp_old=False`` that forward is skipped and ``logp_old`` is None (for a
    spec that uses each rollout for one update, or a caller that computes it later).
    """
    c = torch.as_tensor(classes).repeat_interleave(n)
    ts = time_grid(steps)
    x = torch.randn(c.shape[0], model.dim, generator=generator)
    xs = [x]
    for i in range(steps):
        x, _, _ = sde_step(model, x, float(ts[i]), float(ts[i + 1]), c, noise, generator=generator)
        xs.append(x)
    traj = torch.stack(xs, dim=1)
    sig = torch.tensor([sde_sigma(ts[i], ts[i + 1], noise) for i in range(steps)])
    tstd = torch.tensor([sig[i] * math.sqrt(float(ts[i] - ts[i + 1])) for i in range(steps)])
    B = c.shape[0]
    ro = FlowRollout(traj=traj, classes=c, logp_old=torch.empty(B, steps),
                     step_std=sig.expand(B, steps).clone(), trans_std=tstd.expand(B, steps).clone(),
                     mask=torch.ones(B, steps), samples=traj[:, -1], times=ts, noise=float(noise))
    ro.logp_old = FlowPolicy(model).logprobs(ro)["logp"].detach() if with_logp_old else None
    return ro


# ---------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------


class FlowPolicy:
    """The per-step Gaussian policy pi_theta(x_{t+dt} | x_t, c) = N(mu_theta(x_t), sigma_t^2 |dt| I).

    ``logprobs(rollout)`` evaluates v_theta at every stored x_t in one batched forward
    ([B*T] rows) and returns

        logp          [B, T]     step_logprob(x_{t+dt}, mu_theta, sigma_t sqrt|dt|)  (grad)
        mu            [B, T, D]  mu_theta(x_t)                                         (grad)
        mu_sqdist_ref [B, T]     mean_d (mu_theta - mu_ref)^2 (only with a ref_model;
                                 grad through mu_theta, mu_ref under no_grad)

    Gradients flow only through mu_theta: the stored x_t and x_{t+dt} are detached. With
    equal stds, the Gaussian KL per element is (mu_theta - mu_ref)^2 / (2 sigma^2), so the
    spec's ``mu_sqdist_ref / (2 step_std^2)`` is the code's KL (sigma_t^2, without |dt|).
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None):
        self.model = model
        self.ref_model = ref_model
        if ref_model is not None:
            for p in ref_model.parameters():
                p.requires_grad_(False)

    def _means(self, model, ro: FlowRollout) -> torch.Tensor:
        B, T = ro.traj.shape[0], ro.steps
        x = ro.traj[:, :-1].detach()                                   # [B, T, D]
        t = ro.times[:-1].to(x.dtype)
        v = model(x.reshape(B * T, -1), t.repeat(B), ro.classes.repeat_interleave(T))
        v = v.reshape(B, T, -1)
        mus = [sde_mean_std(x[:, i], v[:, i], ro.times[i], ro.times[i + 1], ro.noise)[0] for i in range(T)]
        return torch.stack(mus, dim=1)

    def logprobs(self, ro: FlowRollout) -> dict:
        mu = self._means(self.model, ro)
        out = {"mu": mu, "logp": step_logprob(ro.traj[:, 1:].detach(), mu, ro.trans_std)}
        if self.ref_model is not None:
            with torch.no_grad():
                mu_ref = self._means(self.ref_model, ro)
            out["mu_sqdist_ref"] = (mu - mu_ref).pow(2).mean(-1)
        return out
