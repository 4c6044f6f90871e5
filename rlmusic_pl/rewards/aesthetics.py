"""Audiobox Aesthetics reward (Meta; PyPI ``audiobox-aesthetics``, CC-BY-4.0): the quality half of MusicRL-R.

Audiobox Aesthetics predicts four scores on a 1-10 scale from 16 kHz audio: production quality (PQ),
production complexity (PC), content enjoyment (CE) and content usefulness (CU). Its model class
(``audiobox_aesthetics.model.aes.AesMultiOutput``) needs only torch and huggingface_hub; the package's
``infer.py`` needs torchaudio, so the resampling (julius) and the 10 s windowing are done here, the way
``infer.py`` does them: consecutive windows, the last one zero-padded and masked, each window's
prediction weighted by the share of it that holds audio.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rlmusic_pl.data.audio import resample
from rlmusic_pl.errors import MissingExtraError
from rlmusic_pl.rewards.base import Reward, RewardError

AXES = ("PQ", "PC", "CE", "CU")
SAMPLE_RATE = 16_000  # the rate the WavLM encoder was trained at
SCORE_RANGE = (1.0, 10.0)
INSTALL = ("pip install 'rlmusic_pl[aesthetics]' (where torchaudio has no build for your torch: "
           "pip install --no-deps audiobox-aesthetics; the model itself needs only torch and huggingface_hub)")


def load_aesthetics_model(model: str) -> nn.Module:
    """``AesMultiOutput.from_pretrained(model)``; MissingExtraError naming the extra when the package is missing."""
    try:
        from audiobox_aesthetics.model.aes import AesMultiOutput
    except ImportError as err:
        raise MissingExtraError(f"AestheticsReward needs the audiobox-aesthetics package ({err}); install it with {INSTALL}") from err
    try:
        return AesMultiOutput.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise OSError(f"Audiobox Aesthetics model {model!r}: not a model directory or a reachable hub model ({err})") from err


def axis_weights(axes: str | dict[str, float]) -> dict[str, float]:
    """The weight of each scored axis, summing to 1; RewardError on unknown axes or weights that are not positive."""
    weights = {axes: 1.0} if isinstance(axes, str) else {str(k): float(v) for k, v in dict(axes).items()}
    unknown = sorted(set(weights) - set(AXES))
    if not weights or unknown:
        raise RewardError(f"AestheticsReward axes: expected one or more of {list(AXES)}, got {axes!r}")
    if any(not math.isfinite(w) or w <= 0 for w in weights.values()):
        raise RewardError(f"AestheticsReward axes: weights must be finite and > 0, got {weights}")
    total = sum(weights.values())
    return {axis: weight / total for axis, weight in weights.items()}


def windows(waveforms: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Consecutive windows of ``window`` samples of waveforms [B, T], the last zero-padded.

    Returns the windows [B * W, 1, window] (clip-major), their masks (True on audio) of the same
    shape, and each window's weight [B, W]: the share of it that holds audio.
    """
    batch, length = waveforms.shape
    count = math.ceil(length / window)
    padded = torch.nn.functional.pad(waveforms, (0, count * window - length))
    mask = (torch.arange(count * window, device=waveforms.device) < length).expand(batch, -1)
    filled = (length - window * torch.arange(count, device=waveforms.device)).clamp(max=window) / window
    return padded.reshape(-1, 1, window), mask.reshape(-1, 1, window), filled.expand(batch, -1)


class AestheticsReward(Reward):
    """Audiobox Aesthetics score of each clip: one axis or a weighted mean of several.

    The audio is resampled to 16 kHz and cut into ``window_seconds`` windows (the last padded and
    masked); each axis' score is the mean of its window scores weighted by how much of each window
    holds audio, as Audiobox Aesthetics' own inference computes it. The model's weights come from the
    hub (or a local directory) when the reward is built; the package is an optional extra.

    Components: the score of each chosen axis under its name (``PQ``, ...); the reward is their
    weighted mean. MusicRL-R maps its quality score into [0, 1] before mixing it with text adherence:
    with ``unit_range`` the 1-10 scores become (score - 1) / 9.

    Args:
        axes: ``PQ`` (production quality), ``PC`` (production complexity), ``CE`` (content enjoyment),
            ``CU`` (content usefulness), or a weight per axis, e.g. ``{PQ: 2, CE: 1}`` (normalised to sum to 1).
        model: hub id or local directory of the ``AesMultiOutput`` weights.
        window_seconds: the window the model scores (it was trained on 10 s).
        unit_range: map the 1-10 scale to [0, 1].
        predictor: an already built model with ``AesMultiOutput``'s interface (called with
            ``{"wav": [N, 1, T], "mask": [N, 1, T]}``, returning normalised scores [N] per axis, with a
            ``target_transform`` of each axis' mean and std); default: loaded from ``model``.
        name: the name under which the reward is logged.
    """

    def __init__(
        self,
        axes: str | dict[str, float] = "PQ",
        model: str = "facebook/audiobox-aesthetics",
        window_seconds: float = 10.0,
        unit_range: bool = True,
        predictor: nn.Module | None = None,
        name: str = "aesthetics",
    ) -> None:
        super().__init__(name)
        self.weights = axis_weights(axes)
        if not window_seconds > 0:
            raise RewardError(f"AestheticsReward: window_seconds must be > 0, got {window_seconds}")
        self.window = round(window_seconds * SAMPLE_RATE)
        self.unit_range = unit_range
        self.predictor = (predictor if predictor is not None else load_aesthetics_model(model)).eval().requires_grad_(False)

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        return self.combine(self.components(waveforms, sample_rate, prompts, attributes))

    def components(
        self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]
    ) -> dict[str, Tensor]:
        return self.axis_scores(waveforms, sample_rate)

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        return sum(weight * components[axis] for axis, weight in self.weights.items())

    @torch.no_grad()
    def axis_scores(self, waveforms: Tensor, sample_rate: int) -> dict[str, Tensor]:
        """Each chosen axis' score [B] of waveforms [B, T] at ``sample_rate`` (1-10, or [0, 1] with ``unit_range``)."""
        audio = resample(waveforms.float(), sample_rate, SAMPLE_RATE)
        wav, mask, weights = windows(audio, self.window)
        device = next(self.predictor.parameters(), torch.empty(0)).device
        predictions = self.predictor({"wav": wav.to(device), "mask": mask.to(device)})
        scores = {}
        for axis in self.weights:
            transform = self.predictor.target_transform[axis]
            per_window = (predictions[axis].float() * transform["std"] + transform["mean"]).reshape(weights.shape)
            score = (per_window * weights.to(per_window.device)).sum(-1) / weights.sum(-1).to(per_window.device)
            low, high = SCORE_RANGE
            scores[axis] = (score - low) / (high - low) if self.unit_range else score
        return scores
