"""Attribute-strength sweeps of a trained adapter (``predict``) and its evaluation (``validate``/``test``).

``predict`` generates, for every prompt of the predict set x seed x strength, one clip:
  1. clips already written under ``<output_dir>/audio`` are read back instead of regenerated (resumable);
  2. the missing strengths of each (prompt, seed) are generated in one UNet batch (one strength per
     sample) with deterministic DDIM (eta = 0) from initial noise seeded by the seed alone, so every
     strength starts from the same noise and only the adapter's strength differs. A clip depends on
     neither the other clips of its batch nor the rank, so a regenerated clip equals the one it replaces;
  3. every clip is scored as it is stored (16-bit PCM), so the table always matches its WAV file.
``SweepWriter`` (rlmusic_pl.callbacks) writes the WAVs, the table, the plots, the mel grid and the listening page.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import soundfile
import torch
from torch import Tensor

from rlmusic_pl.callbacks.prediction_writer import SETTINGS_FILE, SweepWriter
from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.callbacks.sweep_clips import Clip, SweepClips
from rlmusic_pl.data.audio import atomic_write, check_writable, load_audio
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.evaluation import MusicEvaluator
from rlmusic_pl.lora import LORA_WEIGHTS, PEFT_WEIGHTS, SCALE_WEIGHTS, Layout, LoRAError, load_lora, read_adapter_info, read_lora_state_dict
from rlmusic_pl.modules.base import AudioLDM2Module, check_positive
from rlmusic_pl.gain_schedule import load_gain_schedule
from rlmusic_pl.modules.slider import generate_with_schedule, loaded_schedule_attribute
from rlmusic_pl.rewards.base import Reward, as_rewards, check_rewards_for_prompts
from rlmusic_pl.rewards.stability import mel_ssim

log = logging.getLogger(__name__)

SSIM_METRIC = "ssim_to_strength0"
TRAIN_FIRST = "python -m rlmusic_pl fit --config configs/tiny/slider_stage1.yaml"


class SweepError(RLMusicError, ValueError):
    """A sweep is misconfigured or its output directory cannot be used; the message names the field or path."""


def stored_pcm16(waveform: Tensor, sample_rate: int) -> Tensor:
    """``waveform`` [T] exactly as a 16-bit WAV file stores it and ``load_audio`` reads it back."""
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform.detach().float().cpu().clamp(-1.0, 1.0).numpy(), sample_rate, subtype="PCM_16", format="WAV")
    buffer.seek(0)
    data, _ = soundfile.read(buffer, dtype="float32", always_2d=True)
    return torch.from_numpy(data.mean(axis=1))


def check_strengths(strengths) -> list[float]:
    """The strengths as floats; SweepError unless a non-empty list of distinct finite numbers."""
    if isinstance(strengths, (str, bytes)) or not isinstance(strengths, (list, tuple)) or not strengths:
        raise SweepError(f"strengths must be a non-empty list of numbers such as [-1, 0, 1], got {strengths!r}")
    bad = [s for s in strengths if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)]
    if bad:
        raise SweepError(f"strengths must be finite numbers, got {bad[0]!r} in {list(strengths)!r}")
    values = [float(s) + 0.0 for s in strengths]  # + 0.0 turns -0.0 into 0.0 (one file name for zero)
    if len(set(values)) != len(values):
        raise SweepError(f"strengths must be distinct, got {list(strengths)!r}")
    return values


def check_seeds(seeds) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)) or not seeds:
        raise SweepError(f"seeds must be a non-empty list of integers such as [0, 1, 2], got {seeds!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"seeds must be distinct non-negative integers, got {list(seeds)!r}")
    return list(seeds)


def resolve_adapter(adapter: str | Path, layout: Layout = "diffusers", train_first: str = TRAIN_FIRST,
                    config: str = "configs/tiny/sweep.yaml") -> Path:
    """The adapter directory of ``adapter`` (a directory, or its weights file), saved in ``layout``.

    A missing directory is reported with how to train one (``train_first``, for ``config``).
    """
    path = Path(adapter).expanduser()
    if path.is_file() and path.name in (LORA_WEIGHTS, PEFT_WEIGHTS, SCALE_WEIGHTS):
        path = path.parent
    if not path.exists():
        raise LoRAError(
            f"adapter {path}: no such directory. Train an adapter first (for {config}: `{train_first}`) "
            "or point --model.adapter=PATH at a trained adapter directory"
        )
    weights = PEFT_WEIGHTS if layout == "peft" else LORA_WEIGHTS
    if not (path / weights).is_file():
        raise LoRAError(f"adapter {path}: not a LoRA adapter of this backbone (expected a directory holding {weights}, "
                        "as the fit runs save it)")
    read_lora_state_dict(path)  # fail now, not after the backbone has loaded, if the file is not a LoRA
    return path


def adapter_digest(directory: Path) -> str:
    """SHA-256 over an adapter directory's file names and bytes: what a sweep's clips were made with."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def warn_if_trained_on_another_backbone(adapter: Path, backbone: str) -> dict:
    """The adapter's saved metadata (empty if none), with a warning if it was trained on another backbone than ``backbone``."""
    info = read_adapter_info(adapter) if (adapter / SCALE_WEIGHTS).is_file() else {}
    trained_on = info.get("backbone")
    if trained_on is not None and trained_on != backbone:
        log.warning("adapter %s was trained on backbone %r but the sweep loads %r", adapter, trained_on, backbone)
    return info


class SweepPredictor:
    """What every sweep module shares: ``predict`` over prompt x seed x strength, resumable, scored, for ``SweepWriter``.

    A module mixes it in before its backbone class and provides ``strengths``, ``seeds``, ``metrics``
    (a ModuleList of rewards), the hyperparameters ``output_dir`` and ``sample_batch_size``, and:
    ``generate(clips, strengths)`` (waveforms of one (prompt, seed) at several strengths, or of several
    clips at one strength), ``generation_settings()`` (what decides a clip's audio besides its prompt,
    strength and seed) and ``expected_samples()`` (the length of a clip).
    """

    # ------------------------------------------------------------------------- output
    @property
    def sweep_dir(self) -> Path:
        """``output_dir``, or ``<trainer default_root_dir>/sweep``."""
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir).expanduser()
        return Path(self.trainer.default_root_dir if self._trainer is not None else ".") / "sweep"

    def clip_path(self, clip: Clip) -> Path:
        return self.sweep_dir / "audio" / clip.file_name

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "predict":  # before the backbone loads
            check_writable(self.sweep_dir, "output_dir", SweepError)
            check_rewards_for_prompts(self.metrics, self.sweep_prompts(), ["predict"])
            check_same_settings(self.sweep_dir, self.generation_settings())

    def frozen_modules(self) -> list[torch.nn.Module]:
        return super().frozen_modules() + [self.metrics]  # the metrics are fixed judges, as the backbone is

    def sweep_prompts(self):
        """What lists the sweep's prompts by split for the metrics' checks (the data module; see ``check_rewards_for_prompts``)."""
        return self.trainer.datamodule

    def on_predict_start(self) -> None:
        if not any(isinstance(c, SweepWriter) for c in self.trainer.callbacks):
            log.warning("no SweepWriter among the trainer's callbacks: the sweep's clips will not be written")

    # ------------------------------------------------------------------------- the sweep
    def predict_step(self, batch: dict, batch_idx: int) -> SweepClips:
        clips = self.batch_clips(batch, self.strengths)
        audio = {clip.file_name: self.read_clip(clip) for clip in clips if self.clip_path(clip).is_file()}
        new_audio = {}
        for start in range(0, len(clips), len(self.strengths)):  # the strengths of one (prompt, seed)
            missing = [clip for clip in clips[start : start + len(self.strengths)] if clip.file_name not in audio]
            for chunk in chunks(missing, self.hparams.sample_batch_size):
                waves = self.generate(chunk[:1], [clip.strength for clip in chunk])
                new_audio.update((clip.file_name, stored_pcm16(wave, self.backbone.sample_rate)) for clip, wave in zip(chunk, waves))
        audio.update(new_audio)
        return SweepClips(clips=self.score(clips, audio), new_audio=new_audio, sample_rate=self.backbone.sample_rate)

    def batch_clips(self, batch: dict, strengths: list[float]) -> list[Clip]:
        """Every (prompt, seed, strength) of a batch, prompt slowest and strength fastest."""
        return [
            Clip(item, prompt, negative, dict(attributes), seed, strength)
            for item, (prompt, negative, attributes) in enumerate(zip(batch["prompt"], batch["negative_prompt"], batch["attributes"]))
            for seed in self.seeds
            for strength in strengths
        ]

    def read_clip(self, clip: Clip) -> Tensor:
        """A clip written by an earlier run; SweepError if it does not fit this sweep's settings."""
        path = self.clip_path(clip)
        wave = load_audio(path, self.backbone.sample_rate)  # AudioError naming the file if unreadable
        info = soundfile.info(str(path))
        expected = self.expected_samples()
        if info.samplerate != self.backbone.sample_rate or wave.shape[0] != expected:
            raise SweepError(
                f"{path}: holds {info.frames} samples at {info.samplerate} Hz, but this sweep makes {expected} at "
                f"{self.backbone.sample_rate} Hz (duration_s changed?); delete the old clips or choose another output_dir"
            )
        return wave

    def score(self, clips: list[Clip], audio: dict[str, Tensor]) -> list[Clip]:
        """``clips`` with their metrics: every metric's components, and SSIM to the strength-0 clip."""
        waves = torch.stack([audio[clip.file_name] for clip in clips]).to(self.device)
        prompts, attributes = [c.prompt for c in clips], [c.attributes for c in clips]
        columns: dict[str, Tensor] = {}
        for metric in self.metrics:
            result = metric.evaluate(waves, self.backbone.sample_rate, prompts, attributes)
            for name, values in {**result.components, metric.name: result.total}.items():
                if name in columns:
                    raise SweepError(f"two metrics report a value named {name!r}: give the rewards distinct names")
                columns[name] = values
        if 0.0 in self.strengths:
            reference = torch.stack([audio[replace(c, strength=0.0).file_name] for c in clips]).to(self.device)
            columns[SSIM_METRIC] = mel_ssim(waves, reference, self.backbone.sample_rate)
        return [replace(clip, metrics={name: float(values[i]) for name, values in columns.items()}) for i, clip in enumerate(clips)]


class SweepModule(SweepPredictor, AudioLDM2Module):
    """Attribute-strength sweeps and evaluation of a trained adapter on AudioLDM2.

    ``predict``: for each prompt x strength x seed one clip, generated from the same noise for every
    strength of a (prompt, seed); with ``SweepWriter`` among the trainer's callbacks it writes one
    16-bit WAV per clip, a table of metrics (CSV and JSON), a plot of each metric against strength,
    a mel-spectrogram grid and a listening page (``index.html``), and a re-run only generates the
    clips that are missing.
    ``validate`` / ``test``: clips at ``eval_strength`` for every prompt and seed, reported as mean
    CLAP similarity and emotion accuracy per class and overall (seed 001, Tables 1 and 2), from the
    ``CLAPReward`` and ``EmotionReward`` among ``metrics``.

    The adapter may be a Stage-1 slider, a Stage-2 slider with scale layers or a DDPO LoRA (read from
    its saved metadata; the LoRA settings are the saved ones). Strength 0 is the base model; for a
    DDPO LoRA strength 1 is the fine-tuned model, so a sweep over [0, 1] compares base and tuned.

    Args:
        adapter: directory of a trained adapter (``<run dir>/adapter`` or a copy under ``checkpoints/``).
        strengths: signed adapter strengths to sweep (0 = the base model).
        seeds: noise seeds; each (prompt, seed) uses the same noise at every strength.
        output_dir: where clips, table and plots go (default: ``<trainer default_root_dir>/sweep``).
        metrics: rewards whose components are the table's metrics (e.g. CLAP similarity, emotion
            probability, an attribute metric; a plain function is wrapped in ``CallableReward``); the
            SSIM of each clip's mel to its strength-0 clip is added when 0 is among the strengths.
        duration_s: seconds of audio per clip.
        num_steps: DDIM steps per clip.
        guidance_scale: classifier-free guidance scale.
        start_fraction: fraction of the steps run at strength 0 before the adapter is switched on
            (Concept Sliders' ``start_noise``: keeps the base model's coarse structure); 0 = from the start.
        eval_strength: the strength at which ``validate``/``test`` generate.
        sample_batch_size: most clips per UNet batch.
        **backbone_args: see ``AudioLDM2Module`` (backbone, frozen dtype, ...). The LoRA rank,
            alpha and targets are read from the adapter, not from these.
    """

    hparams_ignore = ("metrics",)

    def __init__(
        self,
        adapter: str,
        strengths: list[float] = (-1.0, -0.5, 0.0, 0.5, 1.0),
        seeds: list[int] = (0, 1, 2),
        output_dir: str | None = None,
        metrics: list[Reward] | None = None,
        duration_s: float = 10.0,
        num_steps: int = 50,
        guidance_scale: float = 3.5,
        start_fraction: float = 0.0,
        eval_strength: float = 1.0,
        sample_batch_size: int = 4,
        **backbone_args,
    ) -> None:
        super().__init__(**backbone_args)
        self.strengths = check_strengths(strengths)
        self.seeds = check_seeds(seeds)
        check_positive(SweepError, duration_s=duration_s, num_steps=num_steps, sample_batch_size=sample_batch_size)
        if not 0.0 <= start_fraction < 1.0:
            raise SweepError(f"start_fraction must be in [0, 1), got {start_fraction}")
        self.adapter_path = resolve_adapter(adapter, self.adapter_layout)
        self.adapter_kind = warn_if_trained_on_another_backbone(self.adapter_path, self.hparams.backbone).get("kind", "LoRA")
        self.metrics = torch.nn.ModuleList(as_rewards(metrics, "SweepModule metrics"))
        self.evaluator = MusicEvaluator.from_rewards(list(self.metrics))

    def add_adapters(self, unet: torch.nn.Module) -> None:
        load_lora(unet, self.adapter_path)
        # A Stage-2 adapter's scale-layer multipliers (by strength, step and clip) apply to every generation.
        self.gain_schedule = load_gain_schedule(unet, self.adapter_path)
        self.schedule_attribute = loaded_schedule_attribute(self.gain_schedule, self.backbone, self.hparams.duration_s, self.adapter_path)
        log.info("sweeping a %s adapter from %s", self.adapter_kind, self.adapter_path)

    def generation_settings(self) -> dict:
        """Everything that decides a clip's audio besides its prompt, strength and seed."""
        hp = self.hparams
        names = ("backbone", "backbone_seed", "text_length", "duration_s", "num_steps", "guidance_scale", "start_fraction")
        return {"adapter_sha256": adapter_digest(self.adapter_path), **{name: hp[name] for name in names}}

    @torch.no_grad()
    def generate(self, clips: list[Clip], strengths: list[float]) -> Tensor:
        """Waveforms [len(strengths) * B, T] (cpu, strength-major) of the B ``clips``' prompts and seeds at ``strengths``."""
        hp = self.hparams
        cond = self.backbone.encode_prompts([c.prompt for c in clips], [c.negative_prompt for c in clips])
        # One cpu generator per clip: its noise depends on its seed only, not on the batch or the device.
        noise = torch.cat([self.backbone.initial_latents(1, hp.duration_s, torch.Generator().manual_seed(c.seed)) for c in clips])
        latents = generate_with_schedule(self.backbone, cond, noise, strengths, hp.num_steps, hp.guidance_scale, hp.start_fraction,
                                         self.gain_schedule, attribute_of=self.schedule_attribute)
        return self.backbone.decode(latents, hp.duration_s).float().cpu()

    def expected_samples(self) -> int:
        return self.backbone.num_samples(self.hparams.duration_s)

    # ------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _evaluate(self, batch: dict) -> dict:
        strength = float(self.hparams.eval_strength)
        clips = self.batch_clips(batch, [strength])
        waves = torch.cat([self.generate(chunk, [strength]) for chunk in chunks(clips, self.hparams.sample_batch_size)])
        prompts, attributes = [c.prompt for c in clips], [c.attributes for c in clips]
        self.evaluator.update(waves.to(self.device), self.backbone.sample_rate, prompts, attributes)
        samples = SampleBatch(waves, self.backbone.sample_rate, prompts, attributes, rewards={}, strengths=torch.full((len(clips),), strength))
        return {"samples": samples}

    def _log_evaluation(self, stage: str) -> None:
        # torchmetrics has already summed the states over ranks: no further sync.
        for name, value in self.evaluator.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("clap_similarity", "emotion_accuracy"))
        self.evaluator.reset()


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def check_same_settings(directory: Path, settings: dict) -> None:
    """Record the sweep's generation settings in ``directory``, or refuse clips made under other ones."""
    path = directory / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        if changed:
            raise SweepError(
                f"{directory} holds a sweep made with other settings ({', '.join(changed)} differ): its clips would be "
                "reused as if they were this sweep's. Choose another --model.output_dir, or delete that folder"
            )
        return
    text = json.dumps(settings, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
