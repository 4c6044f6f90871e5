"""Cheap deterministic signal rewards (loudness, spectral centroid, band energy, flux) for tests and demos.

They need no model, run in milliseconds and move predictably with simple changes of the audio
(louder, brighter, more bass), which makes them useful to check that an RL loop climbs a reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlmusic_pl.data.audio import AUDIOLDM_MEL, log_mel, resample
from rlmusic_pl.rewards.base import Reward

EPS = 1e-8


def magnitude_spectrogram(waveforms: Tensor, sample_rate: int, n_fft: int) -> tuple[Tensor, Tensor]:
    """Hann-window STFT magnitudes [B, n_fft // 2 + 1, frames] and the centre frequency of each bin in Hz."""
    spec = torch.stft(
        waveforms.float(),
        n_fft=n_fft,
        hop_length=n_fft // 4,
        window=torch.hann_window(n_fft, device=waveforms.device),
        center=True,
        pad_mode="constant",  # reflect padding fails on clips shorter than half a window
        return_complex=True,
    ).abs()
    freqs = torch.fft.rfftfreq(n_fft, d=1.0 / sample_rate, device=waveforms.device)
    return spec, freqs


def distance_to_target(values: Tensor, target: float | None) -> Tensor:
    """``values`` themselves, or ``-|values - target|`` (highest when on target) if a target is set."""
    return values if target is None else -(values - target).abs()


class LoudnessReward(Reward):
    """Loudness as RMS level in dB (full scale: a unit sine is -3 dB), or closeness to a target level.

    Args:
        target_db: if set, the reward is ``-|level_db - target_db|`` instead of the level itself.
        name: the name under which the reward is logged.
    """

    def __init__(self, target_db: float | None = None, name: str = "loudness") -> None:
        super().__init__(name)
        self.target_db = target_db

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        rms = waveforms.float().pow(2).mean(dim=-1).sqrt()
        return distance_to_target(20.0 * torch.log10(rms + EPS), self.target_db)


class SpectralCentroidReward(Reward):
    """Brightness: the magnitude-weighted mean frequency of the whole clip, or closeness to a target.

    Args:
        normalize: report the centroid as a fraction of the Nyquist frequency (in [0, 1]) instead of Hz.
        target: if set, the reward is ``-|centroid - target|`` (same unit as the centroid).
        n_fft: STFT window length in samples.
        name: the name under which the reward is logged.
    """

    def __init__(
        self, normalize: bool = True, target: float | None = None, n_fft: int = 1024, name: str = "spectral_centroid"
    ) -> None:
        super().__init__(name)
        self.normalize = normalize
        self.target = target
        self.n_fft = n_fft

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        spec, freqs = magnitude_spectrogram(waveforms, sample_rate, self.n_fft)
        # Weighting over all frames at once keeps silent frames from pulling the mean to 0.
        centroid = (freqs[:, None] * spec).sum(dim=(1, 2)) / (spec.sum(dim=(1, 2)) + EPS)
        if self.normalize:
            centroid = centroid / (sample_rate / 2)
        return distance_to_target(centroid, self.target)


class BandEnergyReward(Reward):
    """The fraction of spectral energy between ``low_hz`` and ``high_hz`` (in [0, 1]; 0 for silence).

    Args:
        low_hz: lower edge of the band in Hz (inclusive).
        high_hz: upper edge of the band in Hz (inclusive).
        n_fft: STFT window length in samples.
        name: the name under which the reward is logged.
    """

    def __init__(self, low_hz: float, high_hz: float, n_fft: int = 1024, name: str = "band_energy") -> None:
        super().__init__(name)
        if not 0 <= low_hz < high_hz:
            raise ValueError(f"BandEnergyReward: need 0 <= low_hz < high_hz, got low_hz={low_hz}, high_hz={high_hz}")
        self.low_hz = low_hz
        self.high_hz = high_hz
        self.n_fft = n_fft

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        spec, freqs = magnitude_spectrogram(waveforms, sample_rate, self.n_fft)
        energy = spec.pow(2).sum(dim=2)  # [B, freq]
        in_band = (freqs >= self.low_hz) & (freqs <= self.high_hz)
        return energy[:, in_band].sum(dim=1) / (energy.sum(dim=1) + EPS)


class SpectralFluxReward(Reward):
    """Busyness: the mean absolute frame-to-frame change of the log-mel spectrogram (AudioLDM's, at 16 kHz).

    Higher for changing, eventful audio; lower for steady tones. To reward steadiness, give it a
    negative weight in a ``WeightedReward``, or set ``target``.

    Args:
        target: if set, the reward is ``-|flux - target|``.
        name: the name under which the reward is logged.
    """

    def __init__(self, target: float | None = None, name: str = "spectral_flux") -> None:
        super().__init__(name)
        self.target = target

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        mel = log_mel(resample(waveforms, sample_rate, AUDIOLDM_MEL.sample_rate))
        if mel.shape[1] < 2:
            return torch.zeros(waveforms.shape[0], device=waveforms.device)
        flux = (mel[:, 1:] - mel[:, :-1]).abs().mean(dim=(1, 2))
        return distance_to_target(flux, self.target)
