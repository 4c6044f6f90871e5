"""CLAP reward: cosine similarity between a text's and the generated audio's CLAP embeddings.

Fixes two defects of the published DDPO code (DESIGN.md section 4): the audio is resampled to the
CLAP feature extractor's rate (48 kHz) instead of being fed at 16 kHz, and each embedding is
normalised on its own, so a sample's reward never depends on the rest of the batch.
"""

from __future__ import annotations

import math
import os
import string

import torch
from torch import Tensor
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

from rlmusic_pl.backbone.tiny import byte_level_tokenizer
from rlmusic_pl.data.audio import resample
from rlmusic_pl.rewards.base import Reward, RewardError
from rlmusic_pl.rewards.laion_clap import load_laion_checkpoint

TINY = "tiny"


def tiny_clap(seed: int = 0) -> tuple[ClapModel, ClapProcessor]:
    """A random-weight CLAP small enough for CPU tests, built offline and deterministically from ``seed``."""
    tokenizer = byte_level_tokenizer(128)
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=tokenizer.model_max_length + 2,  # RoBERTa positions start after the pad id
    )
    # spec_size 64 over 16 mel bins takes up to 64 * (64 // 16) = 256 frames: 10 s at hop 1920 is 251.
    audio_config = dict(
        spec_size=64,
        num_mel_bins=16,
        patch_embed_input_channels=1,
        patch_embeds_hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[1, 2],
        window_size=4,
        hidden_size=32,  # = patch_embeds_hidden_size * 2 ** (len(depths) - 1)
    )
    config = ClapConfig(text_config=text_config, audio_config=audio_config, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClapModel(config)
    feature_extractor = ClapFeatureExtractor(
        feature_size=16, hop_length=1920, fft_window_size=2048, max_length_s=10, truncation="rand_trunc"
    )
    return model, ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def load_clap(model: str, checkpoint: str | os.PathLike | None = None, seed: int = 0) -> tuple[ClapModel, ClapProcessor]:
    """CLAP from a hub id or local directory (or ``"tiny"``), with weights from a laion-clap ``checkpoint`` if given."""
    if model == TINY:
        clap, processor = tiny_clap(seed)
    else:
        try:
            processor = ClapProcessor.from_pretrained(model)
            # With a laion checkpoint only the architecture is needed, not the hub weights.
            clap = ClapModel(ClapConfig.from_pretrained(model)) if checkpoint else ClapModel.from_pretrained(model)
        except (OSError, ValueError) as err:  # ValueError: neither an existing directory nor a valid hub id
            raise OSError(f"CLAP model {model!r}: not a CLAP directory or a reachable hub model ({err})") from err
    if checkpoint:
        load_laion_checkpoint(clap, checkpoint)
    return clap, processor


def _embedding(output) -> Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, Tensor) else output.pooler_output


class CLAPReward(Reward):
    """CLAP text-audio cosine similarity in [-1, 1], per sample.

    Text adherence as MusicRL measures it with MuLan: a clip longer than ``chunk_seconds`` is cut
    into chunks of that length, each chunk is compared with the text, and the reward is the mean of
    the chunks' similarities. The chunks are consecutive, except that the last one is the clip's
    final ``chunk_seconds`` (overlapping the one before when the length is not a multiple), so every
    chunk is a whole ``chunk_seconds`` of music and none is padded; a clip no longer than a chunk is
    scored whole. Each chunk is resampled to the feature extractor's rate (48 kHz for laion CLAP);
    audio longer than the extractor's ``max_length_s`` (10 s) is randomly cropped by it, as in
    laion-clap, so chunks of 10 s or less see all of the clip. The CLAP model is loaded once and frozen.

    Args:
        model: hub id or local directory of a transformers CLAP (model, tokenizer, feature
            extractor), or ``"tiny"`` for a small random-weight CLAP built offline (tests, demos).
        checkpoint: optional laion-clap ``.pt`` file (e.g. ``music_audioset_epoch_15_esc_90.14.pt``)
            whose weights replace ``model``'s; ``model`` then only supplies the architecture and
            preprocessing and must match it (``laion/larger_clap_music`` for that file).
        text: the text each sample is compared with: a ``str.format`` template over ``prompt`` and
            the sample's attributes, e.g. ``"{prompt}"`` or ``"a {emotion} piano solo"``.
        seed: weight seed of the ``"tiny"`` model.
        chunk_seconds: the chunk length whose similarities are averaged (MusicRL: 10 s); None scores
            every clip whole.
        name: the name under which the reward is logged.
    """

    def __init__(
        self,
        model: str = "laion/larger_clap_music",
        checkpoint: str | None = None,
        text: str = "{prompt}",
        seed: int = 0,
        chunk_seconds: float | None = 10.0,
        name: str = "clap",
    ) -> None:
        super().__init__(name)
        if chunk_seconds is not None and not chunk_seconds > 0:
            raise ValueError(f"CLAPReward: chunk_seconds must be > 0 or None, got {chunk_seconds}")
        self.chunk_seconds = chunk_seconds
        try:
            list(string.Formatter().parse(text))
        except ValueError as err:
            raise ValueError(f"CLAPReward: text template {text!r} is not a valid format string ({err})") from err
        self.text = text
        clap, processor = load_clap(model, checkpoint, seed)
        self.model = clap.eval().requires_grad_(False)
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer

    def forward(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> Tensor:
        texts = [self.reward_text(prompt, attrs) for prompt, attrs in zip(prompts, attributes)]
        chunk = None if self.chunk_seconds is None else round(self.chunk_seconds * sample_rate)
        chunks = clip_chunks(waveforms, chunk)  # [B, C, L]
        audio = self.embed_audio(chunks.flatten(0, 1), sample_rate).view(*chunks.shape[:2], -1)
        similarity = torch.nn.functional.cosine_similarity(self.embed_text(texts)[:, None], audio, dim=-1)
        return similarity.mean(1).float()

    @property
    def required_attributes(self) -> frozenset[str]:
        """The attributes ``text`` names besides ``prompt``."""
        names = {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(self.text) if field}
        return frozenset(names - {"prompt"})

    def reward_text(self, prompt: str, attributes: dict[str, str]) -> str:
        """The text one sample is scored against (``text`` filled in with its prompt and attributes)."""
        try:
            return self.text.format_map({**attributes, "prompt": prompt})
        except (KeyError, IndexError) as err:
            raise RewardError(
                f"reward {self.name!r}: text template {self.text!r} needs {err}, but the sample has only "
                f"'prompt' and attributes {sorted(attributes)}"
            ) from err

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> Tensor:
        """CLAP text embeddings [B, D]."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return _embedding(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))

    @torch.no_grad()
    def embed_audio(self, waveforms: Tensor, sample_rate: int) -> Tensor:
        """CLAP audio embeddings [B, D] of waveforms [B, T] at ``sample_rate``."""
        target_rate = self.feature_extractor.sampling_rate
        audio = resample(waveforms, sample_rate, target_rate).float().cpu().numpy()
        features = self.feature_extractor(list(audio), sampling_rate=target_rate, return_tensors="pt")
        # The extractor marks a random clip as "longer" when none is (a training trick); use the truth.
        is_longer = torch.full((len(audio), 1), audio.shape[-1] > self.feature_extractor.nb_max_samples)
        output = self.model.get_audio_features(
            input_features=features["input_features"].to(self.model.device, self.model.dtype),
            is_longer=is_longer.to(self.model.device),
        )
        return _embedding(output)


def clip_chunks(waveforms: Tensor, chunk: int | None) -> Tensor:
    """Waveforms [B, T] as chunks [B, C, chunk]: consecutive, the last one ending at the clip's end (see ``CLAPReward``).

    A clip no longer than ``chunk`` (or ``chunk`` None) is one chunk, [B, 1, T].
    """
    length = waveforms.shape[-1]
    if chunk is None or length <= chunk:
        return waveforms[:, None]
    count = math.ceil(length / chunk)
    starts = [index * chunk for index in range(count - 1)] + [length - chunk]
    return torch.stack([waveforms[:, start : start + chunk] for start in starts], dim=1)
