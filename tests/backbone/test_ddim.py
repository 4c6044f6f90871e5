"""The DDIM step with log-probability against closed-form formulas (DESIGN.md §4) and diffusers' DDIMScheduler."""

import math

import pytest
import torch
from torch.distributions import Normal

from rlmusic_pl.backbone.ddim import ddim_step_with_logprob
from rlmusic_pl.backbone.tiny import audioldm2_scheduler

NUM_STEPS = 10
SHAPE = (3, 8, 5, 4)


@pytest.fixture
def scheduler():
    scheduler = audioldm2_scheduler()
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def tensors(seed: int, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def reference_mean_std(scheduler, eps, x_t, t: int, eta: float) -> tuple[torch.Tensor, float]:
    """DESIGN.md §4 written out in float64 for a scalar timestep."""
    alphas = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // NUM_STEPS
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.double()
    eps, x_t = eps.double(), x_t.double()
    x0_hat = (x_t - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = torch.sqrt(a_prev) * x0_hat + torch.sqrt(1 - a_prev - sigma**2) * eps
    return mean, float(sigma)


def reference_log_prob(scheduler, eps, x_t, x_prev, t: int, eta: float) -> torch.Tensor:
    mean, sigma = reference_mean_std(scheduler, eps, x_t, t, eta)
    density = Normal(mean, sigma).log_prob(x_prev.double())
    return density.mean(dim=tuple(range(1, density.dim())))


@pytest.mark.parametrize("step_index", [0, 4, NUM_STEPS - 1])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_of_a_given_step_is_the_gaussian_log_density(scheduler, step_index, eta):
    eps, x_t = tensors(0)
    x_prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)) * 0.5 + 0.8 * x_t
    t = int(scheduler.timesteps[step_index])

    returned, log_prob = ddim_step_with_logprob(scheduler, eps, torch.tensor(t), x_t, eta, prev_latents=x_prev)

    expected = reference_log_prob(scheduler, eps, x_t, x_prev, t, eta)
    assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(returned, x_prev)


def test_sampled_step_scores_the_same_as_rescoring_it(scheduler):
    eps, x_t = tensors(1)
    t = scheduler.timesteps[3]
    x_prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(5))
    _, rescored = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, prev_latents=x_prev)
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(log_prob.double(), reference_log_prob(scheduler, eps, x_t, x_prev, int(t), 1.0), rtol=1e-4, atol=1e-4)


def test_sampled_step_has_the_gaussian_log_density_of_a_standard_normal_draw(scheduler):
    # For x = mean + sigma z, the log density is -z^2/2 - log(sigma) - log(sqrt(2 pi)): about -1.42 - log(sigma).
    eps, x_t = tensors(2, shape=(2, 8, 32, 16))
    t = scheduler.timesteps[2]
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(0))
    _, sigma = reference_mean_std(scheduler, eps, x_t, int(t), 1.0)
    expected = -0.5 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob, torch.full_like(log_prob, expected), rtol=0, atol=0.05)


@pytest.mark.parametrize("step_index", [0, 5, NUM_STEPS - 1])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_sample_matches_diffusers_ddim_step_with_the_same_noise(scheduler, step_index, eta):
    eps, x_t = tensors(3)
    t = scheduler.timesteps[step_index]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))

    ours, _ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta, generator=torch.Generator().manual_seed(11))

    theirs = scheduler.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mean_matches_diffusers_ddim_step_without_noise(scheduler):
    # The zero-noise diffusers step is the mean of our Gaussian: it has the highest log-prob.
    eps, x_t = tensors(4)
    t = scheduler.timesteps[4]
    mean = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros(SHAPE)).prev_sample
    reference, _ = reference_mean_std(scheduler, eps, x_t, int(t), 1.0)
    torch.testing.assert_close(mean.double(), reference, rtol=1e-5, atol=1e-5)
    _, at_mean = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, prev_latents=mean)
    _, shifted = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, prev_latents=mean + 0.01)
    assert (at_mean > shifted).all()


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_non_positive_eta_is_refused(scheduler, eta):
    eps, x_t = tensors(5)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, eps, scheduler.timesteps[0], x_t, eta)


def test_last_step_uses_the_final_alpha_and_is_finite(scheduler):
    eps, x_t = tensors(6)
    t = scheduler.timesteps[-1]
    assert int(t) - 1000 // NUM_STEPS < 0, "the last step's previous timestep must be negative"
    x_prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x_prev).all() and torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob.double(), reference_log_prob(scheduler, eps, x_t, x_prev, int(t), 1.0), rtol=1e-4, atol=1e-3)


def test_last_step_reads_final_alpha_cumprod(scheduler):
    # audioldm2's final_alpha_cumprod equals alphas_cumprod[0]; a distinct value shows which one is read.
    scheduler.final_alpha_cumprod = torch.tensor(0.9995)
    eps, x_t = tensors(6)
    t = scheduler.timesteps[-1]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x_prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_prev, scheduler.step(eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob.double(), reference_log_prob(scheduler, eps, x_t, x_prev, int(t), 1.0), rtol=1e-4, atol=1e-3)


def test_per_sample_timesteps_score_each_row_at_its_own_step(scheduler):
    eps, x_t = tensors(7)
    x_prev = 0.9 * x_t + 0.1 * eps
    steps = torch.stack([scheduler.timesteps[0], scheduler.timesteps[-1], scheduler.timesteps[5]])

    _, batched = ddim_step_with_logprob(scheduler, eps, steps, x_t, 1.0, prev_latents=x_prev)

    for row, t in enumerate(steps):
        _, alone = ddim_step_with_logprob(scheduler, eps[row : row + 1], t, x_t[row : row + 1], 1.0, prev_latents=x_prev[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-6, atol=1e-6)
        expected = reference_log_prob(scheduler, eps[row : row + 1], x_t[row : row + 1], x_prev[row : row + 1], int(t), 1.0)
        torch.testing.assert_close(batched[row : row + 1].double(), expected, rtol=1e-4, atol=1e-3)
    assert len(set(batched.tolist())) == 3


def test_float16_inputs_give_a_finite_float32_log_prob(scheduler):
    eps, x_t = (v.half() for v in tensors(8))
    for t in (scheduler.timesteps[0], scheduler.timesteps[-1]):
        x_prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(0))
        assert x_prev.dtype == torch.float16
        assert log_prob.dtype == torch.float32
        assert torch.isfinite(log_prob).all()
        expected = reference_log_prob(scheduler, eps.float(), x_t.float(), x_prev.float(), int(t), 1.0)
        torch.testing.assert_close(log_prob.double(), expected, rtol=1e-3, atol=1e-2)
