"""Per-sample prompt conditioning and classifier-free guidance order ([negative, positive])."""

import pytest
import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
from rlmusic_pl.backbone.conditioning import PromptConditioning

PROMPTS = ["a", "A recording of a happy piano solo, high quality", "an angry drum loop " * 8]
NEGATIVES = ["Low quality, multiple sound sources", "", "noise"]


@pytest.fixture(scope="module")
def backbone():
    return AudioLDM2Backbone.load("tiny", seed=0, text_length=24)


@pytest.fixture(scope="module")
def cond(backbone):
    return backbone.encode_prompts(PROMPTS, NEGATIVES)


def latents(backbone, batch: int, seed: int = 0) -> torch.Tensor:
    return backbone.initial_latents(batch, 1.0, torch.Generator().manual_seed(seed))


def swapped(cond: PromptConditioning) -> PromptConditioning:
    return PromptConditioning(positive=cond.negative, negative=cond.positive)


def assert_same_conditioning(actual: PromptConditioning, expected: PromptConditioning, atol: float = 1e-5) -> None:
    for side in ("positive", "negative"):
        for name in ("generated", "t5", "t5_mask"):
            torch.testing.assert_close(getattr(getattr(actual, side), name), getattr(getattr(expected, side), name), rtol=1e-5, atol=atol)


def test_conditioning_has_fixed_shapes_whatever_the_prompt_length(backbone, cond):
    width = backbone.language_model.config.n_embd
    generated_tokens = backbone.language_model.config.max_new_tokens
    assert len(cond) == 3
    for side in (cond.positive, cond.negative):
        assert side.generated.shape == (3, generated_tokens, width)
        assert side.t5.shape == (3, 24, backbone.text_encoder_2.config.d_model)
        assert side.t5_mask.shape == (3, 24)
    # Masks follow the prompt length up to the fixed length: short prompts are padded, long ones cut.
    assert 0 < cond.positive.t5_mask[0].sum() < cond.positive.t5_mask[1].sum() <= 24
    assert cond.positive.t5_mask[2].sum() == 24
    alone = backbone.encode_prompts([PROMPTS[0]])
    assert alone.positive.t5.shape == (1, 24, cond.positive.t5.shape[-1])
    assert alone.negative.generated.shape == (1, generated_tokens, width)


def test_negative_prompts_default_to_empty_and_must_match_in_number(backbone):
    default = backbone.encode_prompts(["a song"])
    explicit = backbone.encode_prompts(["a song"], [""])
    assert_same_conditioning(default, explicit, atol=0)
    with pytest.raises(ValueError, match="negative prompts"):
        backbone.encode_prompts(["a", "b"], ["only one"])
    with pytest.raises(TypeError):
        backbone.encode_prompts("a single string")


def test_sample_encoded_in_a_batch_equals_sample_encoded_alone(backbone, cond):
    for i in range(len(PROMPTS)):
        assert_same_conditioning(cond[i : i + 1], backbone.encode_prompts([PROMPTS[i]], [NEGATIVES[i]]))


def test_indexing_and_cat_keep_each_samples_rows(backbone, cond):
    picked = cond[torch.tensor([2, 0])]
    assert len(picked) == 2
    assert_same_conditioning(picked, PromptConditioning.cat([cond[2:3], cond[0:1]]), atol=0)
    assert_same_conditioning(picked[1:2], cond[0:1], atol=0)
    assert not torch.equal(picked.positive.t5[0], picked.positive.t5[1])
    repeated = cond.repeat_interleave(2)
    assert len(repeated) == 6
    assert_same_conditioning(repeated[4:6], PromptConditioning.cat([cond[2:3], cond[2:3]]), atol=0)
    as_double = cond.to(torch.float64)
    assert as_double.negative.t5.dtype == torch.float64


def test_guidance_combines_negative_and_positive_predictions_in_that_order(backbone, cond):
    x = latents(backbone, 3)
    t = backbone.set_timesteps(4)[1]
    scale = 3.0

    guided = backbone.predict_noise(x, t, cond, guidance_scale=scale)

    eps_positive = backbone.predict_noise(x, t, cond, guidance_scale=1.0)
    eps_negative = backbone.predict_noise(x, t, swapped(cond), guidance_scale=1.0)
    assert not torch.allclose(eps_positive, eps_negative, atol=1e-3), "the tiny UNet must react to the prompt"
    torch.testing.assert_close(guided, eps_negative + scale * (eps_positive - eps_negative), rtol=1e-4, atol=1e-5)
    swapped_guided = backbone.predict_noise(x, t, swapped(cond), guidance_scale=scale)
    assert not torch.allclose(guided, swapped_guided, atol=1e-3)


def test_guided_prediction_of_each_sample_uses_its_own_conditioning_and_timestep(backbone, cond):
    x = latents(backbone, 3, seed=1)
    timesteps = backbone.set_timesteps(4)[torch.tensor([0, 3, 2])]

    batched = backbone.predict_noise(x, timesteps, cond, guidance_scale=2.5)

    for i in range(3):
        alone = backbone.predict_noise(x[i : i + 1], timesteps[i : i + 1], cond[i : i + 1], guidance_scale=2.5)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)
