"""EMOPIA-style emotion reward: a short-chunk ResNet classifies 3 s chunks into four emotions.

The classifier follows EMOPIA's audio classifier (``ShortChunkCNN_Res`` of Won et al.'s music
tagging models, as trained in ``seungheondoh/EMOPIA_cls``): a log-mel front end at 22,050 Hz,
batch norm on the spectrogram, seven residual 2-D conv blocks with stride 2, global max pooling
over time and a dense head to the four quadrants of the valence/arousal plane:
happy (Q1), angry (Q2), sad (Q3), tender (Q4).

Parameter names match EMOPIA's, so a user's EMOPIA state dict loads (see ``load_emopia_state_dict``).
Differences from EMOPIA's own code, all deliberate:

- The front end is ``rlmusic_pl.data.audio.log_mel`` configured like torchaudio's ``MelSpectrogram``
  + ``AmplitudeToDB`` (power spectrogram, HTK mel scale without norm, decibels), but it pads the
  signal by (n_fft - hop) / 2 instead of n_fft / 2: frames sit half a hop later and a 3 s chunk has
  129 frames instead of 130, which the global max pooling absorbs.
- EMOPIA's network ends in a sigmoid (and was trained with cross-entropy on those sigmoid outputs),
  whose scores do not sum to one. Here probabilities are the softmax of the dense head's logits:
  the same ranking of classes per chunk, and a proper distribution for ``p[target] - p[predicted]``.
- Every chunk counts, the last one zero-padded to 3 s (EMOPIA's inference script drops the tail).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from rlmusic_pl.data.audio import MelConfig, _mel_basis, log_mel, resample
from rlmusic_pl.rewards.base import Reward, RewardError

log = logging.getLogger(__name__)

EMOTIONS = ("happy", "angry", "sad", "tender")
QUADRANTS = ("q1", "q2", "q3", "q4")
EMOPIA_SAMPLE_RATE = 22050
CHUNK_SECONDS = 3.0


def emopia_mel_config(f_max: float = 8000.0) -> MelConfig:
    """EMOPIA's front end: torchaudio ``MelSpectrogram(22050, n_fft=1024, n_mels=128)`` + ``AmplitudeToDB``."""
    return MelConfig(
        sample_rate=EMOPIA_SAMPLE_RATE,
        n_fft=1024,
        hop_length=512,
        win_length=1024,
        n_mels=128,
        f_min=0.0,
        f_max=f_max,
        power=2.0,
        mel_scale="htk",
        mel_norm=None,
        decibels=True,
    )


def emotion_index(value: str) -> int | None:
    """Class index of an emotion name or quadrant ("happy", "Q1", ...; any case), None if unknown."""
    key = value.strip().lower()
    if key in EMOTIONS:
        return EMOTIONS.index(key)
    if key in QUADRANTS:
        return QUADRANTS.index(key)
    return None


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions (the first strided) plus a projected shortcut: EMOPIA's ``Res_2d``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn_1 = nn.BatchNorm2d(out_channels)
        self.conv_2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn_2 = nn.BatchNorm2d(out_channels)
        self.diff = stride != 1 or in_channels != out_channels
        if self.diff:
            # EMOPIA projects the shortcut with a 3x3 conv (not the usual 1x1); kept for its weights.
            self.conv_3 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            self.bn_3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn_2(self.conv_2(self.relu(self.bn_1(self.conv_1(x)))))
        shortcut = self.bn_3(self.conv_3(x)) if self.diff else x
        return self.relu(out + shortcut)


class ShortChunkResNet(nn.Module):
    """Short-chunk ResNet on log-mel spectrograms [N, frames, n_mels] -> class logits [N, n_classes].

    Args:
        n_channels: width of the first blocks (EMOPIA: 128); the last block has 4x this.
        n_classes: number of output classes.
    """

    def __init__(self, n_channels: int = 128, n_classes: int = len(EMOTIONS)) -> None:
        super().__init__()
        widths = [1, n_channels, n_channels, 2 * n_channels, 2 * n_channels, 2 * n_channels, 2 * n_channels, 4 * n_channels]
        self.spec_bn = nn.BatchNorm2d(1)
        # Named layer1..layer7 like EMOPIA so its state dicts load unchanged.
        for index in range(7):
            self.add_module(f"layer{index + 1}", ResBlock2d(widths[index], widths[index + 1]))
        self.dense1 = nn.Linear(4 * n_channels, 4 * n_channels)
        self.bn = nn.BatchNorm1d(4 * n_channels)
        self.dense2 = nn.Linear(4 * n_channels, n_classes)
        self.dropout = nn.Dropout(0.5)
        self.relu = nn.ReLU()

    def forward(self, mels: Tensor) -> Tensor:
        x = self.spec_bn(mels.transpose(1, 2).unsqueeze(1))  # [N, 1, n_mels, frames]
        for index in range(7):
            x = getattr(self, f"layer{index + 1}")(x)
        x = x.amax(dim=(2, 3))  # global max pooling over the (reduced) mel and time axes
        x = self.dropout(self.relu(self.bn(self.dense1(x))))
        return self.dense2(x)


def load_emopia_state_dict(path: str | os.PathLike, model: ShortChunkResNet, mel_config: MelConfig) -> None:
    """Load an EMOPIA classifier checkpoint into ``model``; RewardError naming the file if it does not fit.

    Accepts a plain state dict or a dict with a ``state_dict`` key (Lightning checkpoints); strips
    ``module.`` / ``model.`` prefixes. EMOPIA's torchaudio front-end buffers (``spec.*``) are not
    weights here: the mel filter bank, if present, is checked against ``mel_config`` and dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"emotion classifier checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RewardError(
            f"emotion classifier checkpoint {path}: holds objects other than tensors ({err}); if you trust it, "
            f"re-save its weights with torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise RewardError(f"emotion classifier checkpoint {path}: not a readable torch checkpoint ({err})") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RewardError(f"emotion classifier checkpoint {path}: expected a state dict, got {type(checkpoint).__name__}")
    state = {_strip_prefixes(key): value for key, value in state.items()}
    filter_bank = state.pop("spec.mel_scale.fb", None)
    if filter_bank is not None:
        _check_filter_bank(path, filter_bank, mel_config)
    state = {key: value for key, value in state.items() if not key.startswith(("spec.", "to_db."))}
    _check_keys(path, state, model)
    model.load_state_dict(state)


def _strip_prefixes(key: str) -> str:
    while key.startswith(("module.", "model.")):
        key = key.split(".", 1)[1]
    return key


def _check_filter_bank(path: Path, filter_bank: Tensor, mel_config: MelConfig) -> None:
    expected = _mel_basis(mel_config).T  # torchaudio stores [n_freqs, n_mels]
    if filter_bank.shape != expected.shape or not torch.allclose(filter_bank.float(), expected, atol=1e-4):
        raise RewardError(
            f"emotion classifier checkpoint {path}: its mel filter bank {tuple(filter_bank.shape)} does not match "
            f"this front end (sample_rate {mel_config.sample_rate}, n_fft {mel_config.n_fft}, n_mels {mel_config.n_mels}, "
            f"f_min {mel_config.f_min}, f_max {mel_config.f_max}); set f_max to the value it was trained with"
        )


def _check_keys(path: Path, state: dict[str, Tensor], model: nn.Module) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if mismatched:
        width = state.get("layer1.conv_1.weight")
        hint = f" (the checkpoint has n_channels={width.shape[0]})" if width is not None else ""
        problems.append(f"shape mismatches {mismatched[:3]}{hint}")
    if problems:
        raise RewardError(f"emotion classifier checkpoint {path} does not fit ShortChunkResNet: " + "; ".join(problems))


class EmotionReward(Reward):
    """EMOPIA-style emotion reward from a frozen short-chunk ResNet classifier.

    Audio is resampled to 22,050 Hz and cut into 3 s chunks (the last zero-padded); class
    probabilities are averaged over the chunks. The target emotion comes from each prompt's
    ``attributes[attribute]`` (happy/angry/sad/tender or Q1-Q4, any case).

    Args:
        checkpoint: EMOPIA classifier state dict (``.ckpt``/``.pt``; a dict with ``state_dict`` works,
            ``module.``/``model.`` prefixes are stripped). Loaded once, here. None: random weights
            (deterministic by ``seed``) for tests and demos, with a warning.
        mode: "value": p[target] - p[predicted], dense in [-1, 0]; "label": 1 if the predicted
            class is the target else 0 (sparse; seed 001 found it worse); "probability": p[target]
            (a metric for sweeps: how much the clip sounds like the target emotion).
        attribute: the prompt attribute holding the target emotion.
        name: the name under which this reward is reported.
        n_channels: classifier width (EMOPIA: 128; e.g. 8 for a tiny random classifier).
        f_max: top of the mel filter bank in Hz (EMOPIA's training script defaults to 8000).
        seed: seed of the random weights when no checkpoint is given.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        mode: Literal["value", "label", "probability"] = "value",
        attribute: str = "emotion",
        name: str = "emotion",
        n_channels: int = 128,
        f_max: float = 8000.0,
        seed: int = 0,
    ) -> None:
        super().__init__(name)
        if mode not in ("value", "label", "probability"):
            raise RewardError(f"reward {name!r}: mode must be 'value', 'label' or 'probability', got {mode!r}")
        self.mode = mode
        self.attribute = attribute
        self.mel_config = emopia_mel_config(f_max)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.classifier = ShortChunkResNet(n_channels)
        if checkpoint is None:
            log.warning("reward %r: no emotion classifier checkpoint given; using random weights (seed %d)", name, seed)
        else:
            load_emopia_state_dict(checkpoint, self.classifier, self.mel_config)
        self.classifier.requires_grad_(False)
        self.classifier.eval()

    @torch.no_grad()
    def probabilities(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        """Class probabilities [B, 4] (happy, angry, sad, tender), averaged over 3 s chunks."""
        # Mel power sums overflow float16 (max 65504) for loud audio: stay in fp32 under mixed precision.
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            wave = resample(waveforms.float(), sample_rate, EMOPIA_SAMPLE_RATE)
            batch, length = wave.shape
            chunk = int(CHUNK_SECONDS * EMOPIA_SAMPLE_RATE)
            n_chunks = max(1, math.ceil(length / chunk))
            wave = nn.functional.pad(wave, (0, n_chunks * chunk - length))
            logits = self.classifier(log_mel(wave.reshape(batch * n_chunks, chunk), self.mel_config))
        return logits.softmax(dim=-1).reshape(batch, n_chunks, -1).mean(dim=1)

    def predict(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        """Predicted class index [B] (0 happy, 1 angry, 2 sad, 3 tender)."""
        return self.probabilities(waveforms, sample_rate).argmax(dim=-1)

    def target_classes(self, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        """Target class index [B] from each prompt's ``attributes[self.attribute]``."""
        targets = []
        for prompt, attrs in zip(prompts, attributes):
            value = attrs.get(self.attribute)
            index = emotion_index(value) if isinstance(value, str) else None
            if index is None:
                found = f"{self.attribute}={value!r}" if value is not None else f"no {self.attribute!r} attribute"
                raise RewardError(
                    f"reward {self.name!r}: prompt {prompt!r} has {found}; expected one of "
                    f"{', '.join(EMOTIONS)} or {', '.join(q.upper() for q in QUADRANTS)}"
                )
            targets.append(index)
        return torch.tensor(targets, dtype=torch.long)

    @property
    def required_attributes(self) -> frozenset[str]:
        return frozenset({self.attribute})

    def check_prompts(self, prompts: list[str], attributes: list[dict[str, str]]) -> None:
        self.target_classes(prompts, attributes)  # also refuses values that are no emotion

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        targets = self.target_classes(prompts, attributes).to(waveforms.device)
        probs = self.probabilities(waveforms, sample_rate)
        if self.mode == "label":
            return (probs.argmax(dim=-1) == targets).float()
        target_probability = probs.gather(1, targets[:, None]).squeeze(1)
        return target_probability if self.mode == "probability" else target_probability - probs.amax(dim=-1)
