"""The MusicGen backbone: transformers' MusicGen behind the few operations RL fine-tuning and steering need.

``MusicgenForConditionalGeneration.generate`` returns waveforms only (its ``return_dict_in_generate``
output overwrites the token sequences with audio) and no log-probabilities, so the library samples
with its own loop on the decoder and recomputes the same log-probabilities in one teacher-forced pass.

Tokens. EnCodec turns audio into K parallel streams of codes, ``codes[b, k, f]`` for frame f of
codebook k, F frames at ``frame_rate``. The decoder reads them in the delay pattern: codebook k is
shifted right by k steps behind a begin token, so N = F + K - 1 decoding steps produce F frames, and
position j of codebook k holds frame j - k - 1 (positions outside 0 <= j - k - 1 < F hold the pad
token, which is never sampled nor scored). The decoder output at position j predicts position j + 1.

Policy. With guidance scale s the decoder runs on the batch [conditional; unconditional] (the
unconditional half reads zero text states under a zero mask, as transformers builds it), the logits
are combined as ``uncond + (cond - uncond) * s``, divided by the temperature and cut to the top k.
``sample`` draws from that distribution and ``log_probs`` scores codes under the same one, so an
importance ratio between them is exact.

    backbone = MusicGenBackbone.load("tiny")                       # or "facebook/musicgen-small", a directory
    cond = backbone.encode_prompts(["a bright C note", "a dull G note"])
    sample = backbone.sample(cond, backbone.num_frames(2.0), generator=torch.Generator().manual_seed(0))
    scores = backbone.log_probs(sample.codes, cond)               # == sample.log_probs (to ~1e-6)
    audio = backbone.decode(sample.codes)                         # [B, T] at backbone.sample_rate
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor
from transformers.cache_utils import Cache

from rlmusic_pl.backbone.checkpointing import checkpoint_each
from rlmusic_pl.backbone.conditioning import MusicGenConditioning
from rlmusic_pl.backbone.loading import BackboneLoadError, hub_load_error
from rlmusic_pl.backbone.tiny_musicgen import build_tiny_musicgen

DEFAULT_MODEL = "facebook/musicgen-small"
TINY = "tiny"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
FEATURE_EXTRACTOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass
class MusicGenSample:
    """Codes drawn by ``MusicGenBackbone.sample``.

    Attributes:
        codes: [B, K, F] EnCodec codes (no pad tokens).
        log_probs: [B, K, F] log-probability of each code under the distribution it was drawn from
            (after guidance, temperature and top-k; under greedy decoding, of the argmax code).
    """

    codes: Tensor
    log_probs: Tensor


@dataclass
class TokenScores:
    """Teacher-forced scores of codes, from ``MusicGenBackbone.log_probs``; every tensor is aligned to the codes.

    Attributes:
        log_probs: [B, K, F] log-probability of each code.
        distributions: [B, K, F, V] log-probabilities of the whole codebook at each code's position
            (for an exact KL), or None. Codes cut by top-k have -inf, unless they were asked for
            before the cut (``distributions_before_top_k``).
        hidden_states: [B, K, F, D] the decoder's final (layer-normed) hidden state at the position
            that predicts each code, conditional half only (what a value head reads), or None.
    """

    log_probs: Tensor
    distributions: Tensor | None = None
    hidden_states: Tensor | None = None


def check_musicgen_directory(directory: Path) -> None:
    """Raise ``BackboneLoadError`` naming what is missing if ``directory`` is not a saved MusicGen."""
    if not directory.is_dir():
        raise BackboneLoadError(f"{directory}: not a MusicGen model directory (it is a file)")
    config = directory / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as err:
            raise BackboneLoadError(f"{config}: not a readable model config ({err})") from err
        if model_type != "musicgen":
            raise BackboneLoadError(f"{config}: describes a {model_type!r} model, not 'musicgen' (MusicgenForConditionalGeneration)")
    wanted = {"config.json": ("config.json",), "weights": WEIGHT_FILES, "tokenizer": TOKENIZER_FILES, "feature extractor": FEATURE_EXTRACTOR_FILES}
    missing = [f"{what} ({' or '.join(names)})" for what, names in wanted.items() if not any((directory / n).is_file() for n in names)]
    if missing:
        raise BackboneLoadError(
            f"{directory}: not a MusicGen model directory, missing {', '.join(missing)}; "
            "save one with model.save_pretrained(dir) and processor.save_pretrained(dir)"
        )


def load_musicgen(source: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    """Load MusicGen and its processor from ``"tiny"`` (random weights, offline), a local directory, or a hub id."""
    if source == TINY:
        model, processor = build_tiny_musicgen(seed)
        return model.to(dtype), processor
    local = Path(os.path.expanduser(source))
    if local.exists():
        check_musicgen_directory(local)
    try:
        path = str(local) if local.exists() else source
        return MusicgenForConditionalGeneration.from_pretrained(path, dtype=dtype), MusicgenProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        if local.exists():
            raise BackboneLoadError(f"{local}: could not load MusicGen from this directory ({err})") from err
        raise hub_load_error("MusicGen", source, f"a hub id such as {DEFAULT_MODEL!r}, a saved MusicGen directory, or {TINY!r}", err) from err


class MusicGenBackbone(nn.Module):
    """Frozen MusicGen (T5 text encoder, EnCodec, decoder) with the operations the MusicGen modules use.

    Each operation stands alone: ``encode_prompts`` (text -> per-sample conditioning), ``sample``
    (our sampling loop: codes and their log-probs), ``log_probs`` (the same log-probs, teacher-forced,
    with optional full distributions and hidden states), ``decode`` / ``encode_audio`` (EnCodec), and
    ``num_frames`` / ``duration_s`` (seconds <-> frames). LoRA goes on ``decoder`` (``rlmusic_pl.lora``);
    its layers are ``decoder.model.decoder.layers`` (hooks for steering).

    Args:
        model: a transformers ``MusicgenForConditionalGeneration`` (mono; see ``MusicGenBackbone.load``).
        processor: its ``MusicgenProcessor`` (the T5 tokenizer is used).
        text_length: T5 tokens per prompt. Every prompt is padded (masked) to this length so that
            conditioning of different prompts can be stored and batched together.
    """

    def __init__(self, model: MusicgenForConditionalGeneration, processor: MusicgenProcessor, text_length: int = 64) -> None:
        super().__init__()
        if model.decoder.config.audio_channels != 1:
            raise BackboneLoadError("stereo MusicGen checkpoints are not supported (decoder.config.audio_channels != 1)")
        if text_length < 1:
            raise ValueError(f"text_length must be >= 1, got {text_length}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.text_length = text_length
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, source: str = DEFAULT_MODEL, seed: int = 0, dtype: torch.dtype = torch.float32, text_length: int = 64) -> MusicGenBackbone:
        """Load from a hub id (default ``facebook/musicgen-small``), a saved directory, or ``"tiny"``.

        A directory is what ``model.save_pretrained(dir)`` and ``processor.save_pretrained(dir)`` write.
        """
        return cls(*load_musicgen(source, seed=seed, dtype=dtype), text_length=text_length)

    # ----------------------------------------------------------------------------- components and shapes
    @property
    def text_encoder(self) -> nn.Module:
        return self.model.text_encoder

    @property
    def audio_encoder(self) -> nn.Module:
        """EnCodec."""
        return self.model.audio_encoder

    @property
    def decoder(self) -> nn.Module:
        """The ``MusicgenForCausalLM`` over the codes: where LoRA and steering hooks go."""
        return self.model.decoder

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def sample_rate(self) -> int:
        return int(self.audio_encoder.config.sampling_rate)

    @property
    def frame_rate(self) -> int:
        """Code frames per second (50 for musicgen-small and the tiny preset)."""
        return int(self.audio_encoder.config.frame_rate)

    @property
    def num_codebooks(self) -> int:
        return int(self.decoder.num_codebooks)

    @property
    def codebook_size(self) -> int:
        """Codes per codebook, V: the decoder's vocabulary (its pad/begin token is V)."""
        return int(self.decoder.config.vocab_size)

    @property
    def pad_token(self) -> int:
        return int(self.decoder.config.pad_token_id)

    def num_frames(self, duration_s: float) -> int:
        """Code frames for ``duration_s`` seconds of audio (rounded to the nearest frame)."""
        if not duration_s * self.frame_rate >= 1:
            raise ValueError(f"duration_s={duration_s} is shorter than one frame ({1 / self.frame_rate:g} s at {self.frame_rate} frames/s)")
        return round(duration_s * self.frame_rate)

    def duration_s(self, num_frames: int) -> float:
        """Seconds of audio that ``num_frames`` code frames decode to."""
        return num_frames / self.frame_rate

    # ----------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> MusicGenConditioning:
        """Per-sample conditioning of ``prompts``, each padded to ``text_length`` tokens."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_prompts expects a list of prompt strings")
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt, got an empty list")
        # Each distinct text once (a batch repeats prompts k times).
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        tokens = self.tokenizer(unique, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt").to(self.device)
        states = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        # What MusicgenForConditionalGeneration.forward does before calling its decoder.
        if getattr(self.model, "enc_to_dec_proj", None) is not None:
            states = self.model.enc_to_dec_proj(states)
        states = states * tokens.attention_mask[..., None]
        return MusicGenConditioning(states, tokens.attention_mask)[index]

    # ----------------------------------------------------------------------------- decoder
    def decoder_forward(
        self, tokens: Tensor, cond: MusicGenConditioning, cache: Cache | None = None, use_cache: bool = False
    ) -> tuple[Tensor, Cache | None]:
        """One decoder call on delayed tokens [B', K, S]; ``cond`` has B' rows (already guided if wanted).

        Returns the final (layer-normed) hidden states [B', S, D] and the KV cache (``use_cache``:
        created on the first call, extended by each call with the next tokens). The logits come from
        ``code_logits`` or ``next_code_logits``.
        """
        output = self.decoder.model(
            input_ids=tokens.reshape(-1, tokens.shape[-1]),
            encoder_hidden_states=cond.hidden_states,
            encoder_attention_mask=cond.attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        return output.last_hidden_state, output.cache

    def code_logits(self, hidden: Tensor, num_frames: int) -> Tensor:
        """The logits that predict each of F codes per codebook, [B', K, F, V], from hidden states [B', F + K - 1, D].

        Codebook k's head reads positions k .. k + F - 1 (the delay pattern), so no other position is computed.
        """
        return torch.stack([head(hidden[:, k : k + num_frames]) for k, head in enumerate(self.decoder.lm_heads)], dim=1)

    def next_code_logits(self, hidden: Tensor) -> Tensor:
        """The logits of every codebook's next token, [B', K, V], from the last of the hidden states [B', S, D]."""
        return torch.stack([head(hidden[:, -1]) for head in self.decoder.lm_heads], dim=1)

    def policy_scores(self, logits: Tensor, guidance_scale: float, temperature: float, top_k: int | None) -> Tensor:
        """The logits of the distribution sampled from: guidance, temperature and top-k, in float32.

        ``logits`` [B', ...V] are the decoder's, with B' = 2B ([conditional; unconditional]) when
        ``guidance_scale != 1``; the result is [B, ..., V], -inf outside the top k. The operations
        are transformers' (ClassifierFreeGuidance-, Temperature- and TopKLogitsWarper), in its order.
        """
        scores = logits.float()
        if guidance_scale != 1.0:
            conditional, unconditional = scores.chunk(2)
            scores = unconditional + (conditional - unconditional) * guidance_scale
        if temperature != 1.0:
            scores = scores / temperature
        return cut_to_top_k(scores, top_k)

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        cond: MusicGenConditioning,
        num_frames: int,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int | None = 250,
        greedy: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> MusicGenSample:
        """Draw ``num_frames`` frames of codes per sample of ``cond``, with each code's log-probability.

        Args:
            cond: per-sample conditioning (``encode_prompts``).
            num_frames: code frames per sample (``num_frames(duration_s)``).
            guidance_scale: classifier-free guidance scale s (1: no guidance, 0: unconditional).
            temperature: softmax temperature (> 0).
            top_k: keep the k most likely codes (None or 0: all).
            greedy: take the most likely code instead of sampling.
            generator: random generator of the draws (None: the global one, as ``generate`` uses), or one
                generator per sample, so that a sample's codes do not depend on the other samples of the batch.
            use_cache: reuse keys and values of earlier steps (False recomputes the whole prefix each step).
            progress: show a progress bar over the decoding steps.
        """
        self._check_policy(cond, temperature, top_k)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        batch, codebooks = len(cond), self.num_codebooks
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} samples: give one per sample, or one for the batch")
        steps = num_frames + codebooks - 1
        guided = guidance_scale != 1.0
        decoder_cond = cond.guided() if guided else cond
        tokens = torch.full((batch, codebooks, steps + 1), self.pad_token, dtype=torch.long, device=self.device)
        step_log_probs = torch.zeros((batch, codebooks, steps + 1), device=self.device)
        holds_code = delay_pattern(codebooks, num_frames, self.device)
        cache = None
        for step in tqdm(range(1, steps + 1), desc="sampling codes", leave=False, disable=not progress):
            inputs = tokens[..., step - 1 : step] if use_cache else tokens[..., :step]
            hidden, cache = self.decoder_forward(torch.cat([inputs, inputs]) if guided else inputs, decoder_cond, cache, use_cache)
            scores = self.policy_scores(self.next_code_logits(hidden), guidance_scale, temperature, top_k)  # [B, K, V]
            if greedy:
                drawn = scores.argmax(-1)
            elif isinstance(generator, (list, tuple)):  # each sample's draws from its own generator
                probs = torch.softmax(scores, dim=-1)
                drawn = torch.stack([torch.multinomial(probs[i], 1, generator=g)[:, 0] for i, g in enumerate(generator)])
            else:
                probs = torch.softmax(scores, dim=-1).view(batch * codebooks, -1)
                drawn = torch.multinomial(probs, 1, generator=generator).view(batch, codebooks)
            step_log_probs[..., step] = torch.log_softmax(scores, dim=-1).gather(-1, drawn[..., None])[..., 0]
            tokens[..., step] = torch.where(holds_code[:, step], drawn, self.pad_token)
        return MusicGenSample(codes=undelay(tokens[..., 1:], num_frames), log_probs=undelay(step_log_probs[..., 1:], num_frames))

    # ----------------------------------------------------------------------------- scoring
    def log_probs(
        self,
        codes: Tensor,
        cond: MusicGenConditioning,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int | None = 250,
        return_distributions: bool = False,
        return_hidden_states: bool = False,
        distributions_before_top_k: bool = False,
    ) -> TokenScores:
        """Teacher-forced log-probabilities of ``codes`` [B, K, F] under the sampling policy, in one decoder pass.

        Differentiable (gradients reach a LoRA on the decoder). The arguments mean what they mean
        in ``sample``; with the same ones, the values equal the sampling loop's.
        ``distributions_before_top_k`` returns the distributions after guidance and temperature but
        before the top-k cut (two models' top k differ, so a KL between cut distributions can be
        infinite); ``log_probs`` are those of the cut policy either way.
        """
        self._check_policy(cond, temperature, top_k)
        self.check_codes(codes, batch=len(cond))
        num_frames = codes.shape[-1]
        inputs = delay(codes, self.pad_token)[..., :-1]  # positions 0 .. N-1 predict 1 .. N
        guided = guidance_scale != 1.0
        hidden, _ = self.decoder_forward(torch.cat([inputs, inputs]) if guided else inputs, cond.guided() if guided else cond)
        uncut = self.policy_scores(self.code_logits(hidden, num_frames), guidance_scale, temperature, None)  # [B, K, F, V]
        distributions = torch.log_softmax(cut_to_top_k(uncut, top_k), dim=-1)
        returned = torch.log_softmax(uncut, dim=-1) if distributions_before_top_k and return_distributions else distributions
        hidden_states = None
        if return_hidden_states:
            conditional = hidden[: len(cond)]
            hidden_states = torch.stack([conditional[:, k : k + num_frames] for k in range(self.num_codebooks)], dim=1)
        return TokenScores(
            log_probs=distributions.gather(-1, codes[..., None])[..., 0],
            distributions=returned if return_distributions else None,
            hidden_states=hidden_states,
        )

    def _check_policy(self, cond: MusicGenConditioning, temperature: float, top_k: int | None) -> None:
        if len(cond) == 0:
            raise ValueError("the conditioning holds no samples")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no cut), got {top_k}")

    def check_codes(self, codes: Tensor, batch: int | None = None) -> None:
        """Raise ``ValueError`` unless ``codes`` is an integer tensor [B, K, F] of valid codes."""
        expected = f"codes [batch, {self.num_codebooks} codebooks, frames] of integers in [0, {self.codebook_size})"
        if not isinstance(codes, Tensor) or codes.dim() != 3 or codes.is_floating_point():
            raise ValueError(f"expected {expected}, got {getattr(codes, 'shape', type(codes))}")
        if codes.shape[1] != self.num_codebooks or codes.shape[2] < 1:
            raise ValueError(f"expected {expected}, got shape {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"expected {expected}, got values in [{int(codes.min())}, {int(codes.max())}]")
        if batch is not None and codes.shape[0] != batch:
            raise ValueError(f"{codes.shape[0]} samples of codes but {batch} of conditioning")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer's activations in the backward pass (less memory, more compute).

        transformers' own switch acts only in training mode; the frozen backbone stays in eval mode.
        """
        checkpoint_each(self.decoder.model.decoder.layers)

    # ----------------------------------------------------------------------------- audio
    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """EnCodec-decode codes [B, K, F] to float32 waveforms [B, T] at ``sample_rate``, as ``generate`` does."""
        self.check_codes(codes)
        audio = self.audio_encoder.decode(codes[None].to(self.device), audio_scales=[None] * codes.shape[0]).audio_values
        return audio[:, 0].float()

    @torch.no_grad()
    def encode_audio(self, waveforms: Tensor) -> Tensor:
        """EnCodec-encode waveforms [B, T] at ``sample_rate`` to codes [B, K, F] (F = ceil(T / samples per frame))."""
        if waveforms.dim() != 2:
            raise ValueError(f"expected mono waveforms [batch, samples], got shape {tuple(waveforms.shape)}")
        dtype = next(self.audio_encoder.parameters()).dtype
        encoded = self.audio_encoder.encode(waveforms[:, None].to(self.device, dtype))
        codes = encoded.audio_codes
        if codes.shape[0] != 1 or any(scale is not None for scale in encoded.audio_scales):
            raise BackboneLoadError("this EnCodec chunks or normalises its input; MusicGen codecs (and the tiny one) do neither")
        if codes.shape[2] != self.num_codebooks:
            raise BackboneLoadError(f"EnCodec gives {codes.shape[2]} codebooks at its default bandwidth, the decoder reads {self.num_codebooks}")
        return codes[0]


def cut_to_top_k(scores: Tensor, top_k: int | None) -> Tensor:
    """``scores`` [..., V] with -inf outside the k largest of each row (None or 0: unchanged)."""
    if not top_k or top_k >= scores.shape[-1]:
        return scores
    # The smallest of the k largest is transformers' threshold; unsorted topk is faster on a CPU.
    kth = torch.topk(scores, top_k, sorted=False).values.amin(-1, keepdim=True)
    return scores.masked_fill(scores < kth, float("-inf"))


def delay_pattern(num_codebooks: int, num_frames: int, device: torch.device | None = None) -> Tensor:
    """[K, F + K] booleans: True where position j of codebook k holds a code (frame j - k - 1)."""
    frame = torch.arange(num_frames + num_codebooks, device=device)[None] - torch.arange(num_codebooks, device=device)[:, None] - 1
    return (frame >= 0) & (frame < num_frames)


def delay(codes: Tensor, pad_token: int) -> Tensor:
    """Codes [B, K, F] to the decoder's delayed sequence [B, K, F + K]: the begin token, then codebook k shifted by k."""
    batch, codebooks, frames = codes.shape
    tokens = codes.new_full((batch, codebooks, frames + codebooks), pad_token)
    tokens[:, _codebook_index(codebooks, codes.device), _positions(codebooks, frames, codes.device) + 1] = codes
    return tokens


def undelay(values: Tensor, num_frames: int) -> Tensor:
    """Per-position values [B, K, F + K - 1, ...] (position j of codebook k) to per-code values [B, K, F, ...].

    Takes position f + k for codebook k: on tokens without the begin token, that is code (k, f); on
    decoder outputs, the output that predicts code (k, f).
    """
    codebooks = values.shape[1]
    return values[:, _codebook_index(codebooks, values.device), _positions(codebooks, num_frames, values.device)]


def _codebook_index(codebooks: int, device: torch.device) -> Tensor:
    return torch.arange(codebooks, device=device)[:, None]


def _positions(codebooks: int, frames: int, device: torch.device) -> Tensor:
    return torch.arange(frames, device=device)[None] + torch.arange(codebooks, device=device)[:, None]
