"""One DDIM step that also returns the log-probability of the step taken (DDPO's policy)."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from torch import Tensor

MIN_STD = 1e-12  # below it a step's Gaussian is treated as this narrow, never as a point


def previous_timestep(scheduler: DDIMScheduler, timestep: Tensor) -> Tensor:
    """The timestep DDIM moves to from ``timestep`` with the scheduler's current number of steps."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return timestep - step


def alpha_products(scheduler: DDIMScheduler, timestep: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative alpha at ``timestep`` and at the previous timestep (``final_alpha_cumprod`` below 0)."""
    alphas = scheduler.alphas_cumprod.to(timestep.device)
    prev = previous_timestep(scheduler, timestep)
    alpha_t = alphas[timestep.clamp(min=0)]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod.to(timestep.device))
    return alpha_t, alpha_prev


def ddim_step_distribution(
    scheduler: DDIMScheduler, noise_pred: Tensor, timestep: Tensor, latents: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """The Gaussian of one stochastic DDIM step, ``x_{t-1} ~ N(mean, std^2)``, in float32.

    Args:
        scheduler: a ``DDIMScheduler`` whose ``set_timesteps`` has been called.
        noise_pred: predicted noise (epsilon), shape [B, ...].
        timestep: the current timestep, a scalar or one per sample [B].
        latents: ``x_t``, shape [B, ...].
        eta: DDIM stochasticity; must be > 0, since eta = 0 gives a zero-variance policy.

    Returns:
        ``(mean [B, ...], std [B, 1, ...])``; ``std`` depends only on the timestep, so two networks'
        steps from the same ``x_t`` share it (the KL between them is then closed-form, ``gaussian_kl``).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic policy with a finite log-prob, got {eta}")
    batch = latents.shape[0]
    shape = (batch,) + (1,) * (latents.dim() - 1)
    timestep = torch.as_tensor(timestep, device=latents.device).long().expand(batch)
    alpha_t, alpha_prev = (a.view(shape).float() for a in alpha_products(scheduler, timestep))
    eps, x_t = noise_pred.float(), latents.float()

    x0_pred = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = alpha_prev.sqrt() * x0_pred + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: Tensor,
    timestep: Tensor,
    latents: Tensor,
    eta: float,
    prev_latents: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Take (or score) one stochastic DDIM step ``x_t -> x_{t-1}`` (arguments as ``ddim_step_distribution``).

    Args:
        prev_latents: ``x_{t-1}`` to score instead of sampling a new one.
        generator: random source for the step's noise when sampling.

    Returns:
        ``(x_{t-1}, log_prob)`` where ``log_prob`` [B] is the mean over non-batch dimensions of the
        Gaussian log density of ``x_{t-1}`` under N(mean, sigma_t^2). Computed in float32, so a
        half-precision UNet cannot underflow the small variance of the last steps.
    """
    mean, std = ddim_step_distribution(scheduler, noise_pred, timestep, latents, eta)
    if prev_latents is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
        prev_latents = mean + std * noise.to(mean.device)
    prev_latents = prev_latents.float().detach()
    return prev_latents.to(latents.dtype), gaussian_log_prob(prev_latents, mean, std)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over non-batch dimensions of the log density of ``sample`` under N(mean, std^2) [B] (float32)."""
    std = std.clamp(min=MIN_STD)  # a zero variance would give an infinite log-density
    log_prob = -((sample.float().detach() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) of two Gaussians with the same std, summed over non-batch
    dimensions [B]: sum ||mean_p - mean_q||^2 / (2 std^2) (DPOK's per-step KL, DESIGN.md section 13)."""
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * std.clamp(min=MIN_STD) ** 2)
    return kl.sum(dim=tuple(range(1, kl.dim())))
