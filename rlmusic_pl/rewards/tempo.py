"""Tempo of audio in beats per minute: the autocorrelation peak of an onset-strength envelope.

The envelope is the positive spectral flux of the log-magnitude STFT (about 86 frames per second at
any sample rate); its autocorrelation over the lags of ``min_bpm`` .. ``max_bpm``, weighted by a prior around 120 bpm,
peaks at the beat period. Enough for metronomic clips such as the synthetic tempo sets; not a general beat tracker.

    TempoReward().evaluate(waveforms, 16000, prompts, attributes).total   # estimated bpm per clip
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlmusic_pl.rewards.base import Reward
from rlmusic_pl.rewards.simple import magnitude_spectrogram

FRAMES_PER_SECOND = 86.0  # hop of the onset envelope, whatever the sample rate


def onset_envelope(waveforms: Tensor, sample_rate: int) -> tuple[Tensor, float]:
    """Positive log-spectral flux [B, frames] (mean removed) and its frame rate."""
    n_fft = 2 ** round(torch.log2(torch.tensor(4 * sample_rate / FRAMES_PER_SECOND)).item())
    spec, _ = magnitude_spectrogram(waveforms, sample_rate, n_fft)  # hop n_fft / 4
    log_spec = torch.log1p(100 * spec)
    flux = (log_spec[..., 1:] - log_spec[..., :-1]).clamp(min=0).sum(dim=1)
    return flux - flux.mean(dim=1, keepdim=True), sample_rate / (n_fft // 4)


def estimate_tempo(waveforms: Tensor, sample_rate: int, min_bpm: float = 40.0, max_bpm: float = 240.0) -> Tensor:
    """Estimated tempo [B] in bpm (NaN for a clip too short to hold one beat period of ``max_bpm``)."""
    envelope, rate = onset_envelope(waveforms, sample_rate)
    frames = envelope.shape[1]
    shortest, longest = max(1, int(rate * 60 / max_bpm)), min(frames - 1, int(rate * 60 / min_bpm))
    if longest < shortest:
        return torch.full((waveforms.shape[0],), float("nan"), device=waveforms.device)
    lags = torch.arange(shortest, longest + 1, device=waveforms.device)
    spectrum = torch.fft.rfft(envelope, n=2 * frames)
    autocorrelation = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * frames)[:, :frames]
    normalised = autocorrelation[:, lags] / (frames - lags)  # unbiased: long lags overlap fewer frames
    bpm = 60.0 * rate / lags.float()
    # A log-normal prior around 120 bpm (one octave wide, as librosa's) settles half/double-tempo ties.
    prior = torch.exp(-0.5 * torch.log2(bpm / 120.0) ** 2)
    return bpm[(normalised.clamp(min=0) * prior).argmax(dim=1)]


class TempoReward(Reward):
    """The estimated tempo in bpm (``estimate_tempo``), or ``-|bpm - target|`` with a target.

    Args:
        min_bpm: slowest tempo considered.
        max_bpm: fastest tempo considered.
        target: if set, the reward is the negative distance to it.
        name: the name under which the value is logged.
    """

    def __init__(self, min_bpm: float = 40.0, max_bpm: float = 240.0, target: float | None = None, name: str = "tempo_bpm") -> None:
        super().__init__(name)
        self.min_bpm, self.max_bpm, self.target = min_bpm, max_bpm, target

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        bpm = estimate_tempo(waveforms, sample_rate, self.min_bpm, self.max_bpm)
        return bpm if self.target is None else -(bpm - self.target).abs()
