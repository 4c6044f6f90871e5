"""A reward learned from pairwise preferences: a frozen encoder, standardised audio features and a small head.

``PreferenceScorer`` is the model ``PreferenceRewardModule`` trains (only its head) and exports;
``PreferenceReward(checkpoint=...)`` loads an export as a ``Reward`` for DDPO, MusicRL, sweeps and
``validate``. The export is a directory written atomically:

- ``reward_model.safetensors``: the head's weights and the audio features' standardisation;
- ``reward_model.json``: how to rebuild the encoder (class path and arguments) and the head (sizes),
  plus the held-out metrics and settings of the run that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlmusic_pl.data.audio import atomic_directory_write
from rlmusic_pl.rewards.base import Reward, RewardError
from rlmusic_pl.rewards.encoders import AudioTextEncoder, EncoderError, build_encoder

WEIGHTS_FILE = "reward_model.safetensors"
CONFIG_FILE = "reward_model.json"
FORMAT = "rlmusic_pl.preference_reward"


class PreferenceScorer(nn.Module):
    """Scores (prompt, clip): ``head([standardise(audio embedding), text embedding])`` -> a scalar per sample.

    The audio embedding is standardised per feature with ``audio_mean`` / ``audio_std`` (buffers set once
    from the training clips, ``set_standardisation``), so features of any scale (log-mel levels, CLAP
    projections) reach the head on a common scale.

    Args:
        encoder: the frozen audio and text encoder.
        hidden_dim: width of the head's hidden layers.
        hidden_layers: number of hidden layers (0: a linear head).
        dropout: dropout on the hidden activations while training (drawn from a given generator).
    """

    def __init__(self, encoder: AudioTextEncoder, hidden_dim: int = 128, hidden_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim < 1 or hidden_layers < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need hidden_dim >= 1, hidden_layers >= 0, 0 <= dropout < 1; got {hidden_dim}, {hidden_layers}, {dropout}")
        self.encoder = encoder.requires_grad_(False)
        self.hidden_dim, self.hidden_layers, self.dropout = hidden_dim, hidden_layers, dropout
        sizes = [encoder.audio_dim + encoder.text_dim] + [hidden_dim] * hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(sizes[-1], 1)
        self.register_buffer("audio_mean", torch.zeros(encoder.audio_dim))
        self.register_buffer("audio_std", torch.ones(encoder.audio_dim))

    def head_state(self) -> dict[str, Tensor]:
        """The trained state: head weights and the standardisation (not the frozen encoder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def set_standardisation(self, audio_embeddings: Tensor) -> None:
        """Standardise audio features with the mean and std of ``audio_embeddings`` [N, audio_dim]."""
        self.audio_mean.copy_(audio_embeddings.mean(dim=0))
        # A constant feature (std 0) stays at 0 instead of exploding.
        self.audio_std.copy_(audio_embeddings.std(dim=0, correction=0).clamp(min=1e-6))

    def score_embeddings(self, audio: Tensor, text: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scores [B] of audio [B, audio_dim] and text [B, text_dim] embeddings; dropout only with a ``generator``."""
        device = self.output.weight.device
        x = torch.cat([(audio.to(device) - self.audio_mean) / self.audio_std, text.to(device)], dim=-1)
        for layer in self.hidden:
            x = nn.functional.gelu(layer(x))
            if generator is not None and self.dropout > 0:
                keep = torch.rand(x.shape, generator=generator, device=generator.device).to(device) >= self.dropout
                x = x * keep / (1.0 - self.dropout)
        return self.output(x).squeeze(-1)

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str]) -> Tensor:
        return self.score_embeddings(self.encoder.embed_audio(waveforms, sample_rate), self.encoder.embed_text(prompts))

    def config(self) -> dict[str, Any]:
        return {"encoder": self.encoder.spec(),
                "head": {"hidden_dim": self.hidden_dim, "hidden_layers": self.hidden_layers, "dropout": self.dropout}}


def save_reward_model(scorer: PreferenceScorer, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Export ``scorer`` to ``directory`` (replaced atomically as a whole); returns the directory."""
    directory = Path(directory)
    state = {k: v.detach().float().cpu().contiguous() for k, v in scorer.head_state().items()}
    config = {"format": FORMAT, "version": 1, **scorer.config(), **(metadata or {})}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    atomic_directory_write(directory, write)
    return directory


def load_reward_model(directory: str | Path) -> tuple[PreferenceScorer, dict[str, Any]]:
    """The scorer exported to ``directory`` and its JSON description; RewardError naming the file if unusable."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise RewardError(f"preference reward checkpoint {directory}: {path.name} not found (expected the directory "
                              "a PreferenceRewardModule run exports, <run dir>/reward_model)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RewardError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RewardError(f"{config_path}: not a preference reward model (format {config.get('format') if isinstance(config, dict) else None!r})")
    try:
        scorer = PreferenceScorer(build_encoder(config["encoder"]), **config["head"])
        state = load_file(str(weights_path))
    except (EncoderError, KeyError, TypeError) as err:
        raise RewardError(f"{config_path}: cannot rebuild the reward model ({err})") from None
    except SafetensorError as err:
        raise RewardError(f"{weights_path}: unreadable safetensors file ({err})") from None
    expected = scorer.head_state()
    if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
        raise RewardError(f"{weights_path}: its tensors do not fit the model {config_path} describes "
                          f"(got {sorted(state)}, expected {sorted(expected)})")
    scorer.load_state_dict(state, strict=False)
    return scorer.eval(), config


class PreferenceReward(Reward):
    """A reward model trained on pairwise preferences (``PreferenceRewardModule``'s export) as a ``Reward``.

    The score is the head's output: a Bradley-Terry utility, so differences between clips are
    log-odds of one being preferred to the other; its absolute level carries no meaning.

    Args:
        checkpoint: the exported directory (``<run dir>/reward_model`` of a ``PreferenceRewardModule`` fit).
        name: the name under which the reward is logged.
    """

    def __init__(self, checkpoint: str, name: str = "preference") -> None:
        super().__init__(name)
        self.checkpoint = checkpoint
        self.scorer, self.config = load_reward_model(checkpoint)
        self.scorer.requires_grad_(False)

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        return self.scorer(waveforms, sample_rate, prompts).float()
