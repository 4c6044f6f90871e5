"""Pitch class of audio: a chroma estimate from the STFT, and a reward for playing a prompt's pitch class.

The chroma folds the power spectrum between ``min_hz`` and ``max_hz`` onto the 12 pitch classes,
each STFT bin spread over its nearest classes by a Gaussian in semitones (``width`` semitones), so
energy between two classes is shared rather than snapped. For harmonic tones the fundamental's
class wins: the 2nd and 4th harmonics fall on the same class, and the 3rd (a fifth) and 5th (a major
third) carry less power than the fundamental for any roll-off at least as steep as 1/k.

    reward = PitchClassReward()
    reward.evaluate(waveforms, 16000, ["a bright C note"], [{"pitch_class": "C"}]).total   # energy share of C
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlmusic_pl.data.synthetic import pitch_class_index
from rlmusic_pl.rewards.base import Reward, RewardError
from rlmusic_pl.rewards.simple import EPS, magnitude_spectrogram


def stft_size(sample_rate: int, window_s: float = 0.25) -> int:
    """The power of two nearest ``window_s`` seconds: long enough to split semitones down to ~100 Hz."""
    return 2 ** round(math.log2(max(16.0, window_s * sample_rate)))


def chroma(waveforms: Tensor, sample_rate: int, min_hz: float = 60.0, max_hz: float = 4000.0, width: float = 0.5) -> Tensor:
    """The share of spectral power in each pitch class, [B, 12] (rows sum to 1; uniform for silence).

    Args:
        waveforms: [B, T] audio.
        sample_rate: its sample rate in Hz.
        min_hz: lowest frequency counted (below it, bins are too coarse to tell semitones apart).
        max_hz: highest frequency counted (clipped to the Nyquist frequency).
        width: standard deviation in semitones of each bin's spread over the pitch classes.
    """
    spec, freqs = magnitude_spectrogram(waveforms, sample_rate, stft_size(sample_rate))
    power = spec.pow(2).sum(dim=2)  # [B, bins]
    keep = (freqs >= min_hz) & (freqs <= min(max_hz, sample_rate / 2))
    semitones = 12 * torch.log2(freqs[keep] / 440.0) + 69  # MIDI number of each bin
    # Signed distance (in semitones, within +-6) from each bin to each pitch class, folded over octaves.
    distance = torch.remainder(semitones[:, None] - torch.arange(12, device=freqs.device) + 6, 12) - 6
    weights = torch.exp(-0.5 * (distance / width) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # each bin's power is shared out, not multiplied
    energy = power[:, keep] @ weights + EPS  # [B, 12]
    return energy / energy.sum(dim=1, keepdim=True)


def estimate_pitch_class(waveforms: Tensor, sample_rate: int, **chroma_args) -> Tensor:
    """The strongest pitch class of each clip, [B] integers 0-11 (C = 0); see ``chroma`` for the arguments."""
    return chroma(waveforms, sample_rate, **chroma_args).argmax(dim=1)


class PitchClassReward(Reward):
    """The share of the clip's chroma in the prompt's target pitch class, in [0, 1] (1/12 for noise).

    The target is the prompt attribute ``attribute`` (a name such as ``"C"``, ``"F#"``, ``"Bb"``, or
    0-11). With ``hard=True`` the reward is 1 where the strongest pitch class is the target, else 0
    (target-note accuracy).

    Args:
        attribute: the prompt attribute naming the target pitch class.
        hard: score accuracy of the argmax instead of the energy share.
        min_hz: lowest frequency counted by the chroma.
        max_hz: highest frequency counted by the chroma.
        name: the name under which the reward is logged.
    """

    def __init__(
        self, attribute: str = "pitch_class", hard: bool = False, min_hz: float = 60.0, max_hz: float = 4000.0,
        name: str = "pitch_class",
    ) -> None:
        super().__init__(name)
        self.attribute = attribute
        self.hard = hard
        self.min_hz = min_hz
        self.max_hz = max_hz

    @property
    def required_attributes(self) -> frozenset[str]:
        return frozenset({self.attribute})

    def check_prompts(self, prompts: list[str], attributes: list[dict[str, str]]) -> None:
        super().check_prompts(prompts, attributes)
        self.targets(prompts, attributes)

    def targets(self, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        """The target pitch class of each prompt, [B]; RewardError naming a prompt whose value is not one."""
        targets = []
        for prompt, attrs in zip(prompts, attributes):
            try:
                targets.append(pitch_class_index(attrs[self.attribute]))
            except KeyError:
                raise RewardError(f"reward {self.name!r} needs the prompt attribute {self.attribute!r}, "
                                  f"but prompt {prompt!r} has only {sorted(attrs)}") from None
            except ValueError as err:
                raise RewardError(f"reward {self.name!r}: prompt {prompt!r}, attribute {self.attribute!r}: {err}") from None
        return torch.tensor(targets, dtype=torch.long)

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        target = self.targets(prompts, attributes).to(waveforms.device)
        shares = chroma(waveforms, sample_rate, self.min_hz, self.max_hz)
        if self.hard:
            return (shares.argmax(dim=1) == target).float()
        return shares.gather(1, target[:, None])[:, 0]

