"""One DDIM step that also returns the log-probability of the step taken (DDPO's policy)."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from torch import Tensor


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


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: Tensor,
    timestep: Tensor,
    latents: Tensor,
    eta: float,
    prev_latents: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Take (or score) one stochastic DDIM step ``x_t -> x_{t-1}``.

    Args:
        scheduler: a ``DDIMScheduler`` whose ``set_timesteps`` has been called.
        noise_pred: predicted noise (epsilon), shape [B, ...].
        timestep: the current timestep, a scalar or one per sample [B].
        latents: ``x_t``, shape [B, ...].
        eta: DDIM stochasticity; must be > 0, since eta = 0 gives a zero-variance policy.
        prev_latents: ``x_{t-1}`` to score instead of sampling a new one.
        generator: random source for the step's noise when sampling.

    Returns:
        ``(x_{t-1}, log_prob)`` where ``log_prob`` [B] is the mean over non-batch dimensions of the
        Gaussian log density of ``x_{t-1}`` under N(mean, sigma_t^2). Computed in float32, so a
        half-precision UNet cannot underflow the small variance of the last steps.
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

    if prev_latents is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device if generator is None else generator.device)
        prev_latents = mean + std * noise.to(x_t.device)
    prev = prev_latents.float().detach()
    std = std.clamp(min=1e-12)  # a zero variance would give an infinite log-density
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return prev.to(latents.dtype), log_prob.mean(dim=tuple(range(1, log_prob.dim())))
