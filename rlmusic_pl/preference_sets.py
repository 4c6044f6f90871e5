"""Synthetic preference sets for demos and tests: k clips per prompt, judged, labelled by a noisy Bradley-Terry rater.

    python -m rlmusic_pl make-preferences OUT --backbone tiny --prompt "a calm piano" --prompt "an angry drum" \
        --clips-per-prompt 4 --judge rlmusic_pl.rewards.SpectralCentroidReward --agreement 0.85

1. every prompt gets ``k`` clips from the backbone (AudioLDM2 or MusicGen, optionally with an adapter);
2. a *judge* reward scores every clip;
3. every pair of a prompt's clips is labelled by sampling the preference from the Bradley-Terry model
   of the judge's scores at temperature T: P(a preferred to b) = sigma((judge(a) - judge(b)) / T)
   (DESIGN.md section 13), so labels are noisy like people's. ``--agreement A`` picks T such that the
   expected agreement of the labels with the judge's noise-free ranking is A.

Written under OUT: ``clips/*.wav`` (16-bit), ``pairs.jsonl`` (prompt, chosen, rejected, attributes:
what ``PreferencePairs`` reads), ``clips.jsonl`` (each clip's prompt and judge score) and
``summary.json`` (the temperature, expected and sampled agreement, counts, settings). Real users bring
their own pairs; this command is for trying the preference pipeline and for measuring it against a
known judge.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from rlmusic_pl.data.audio import atomic_write, write_wav
from rlmusic_pl.data.prompts import PromptError, PromptItem, load_prompt_file, parse_entry
from rlmusic_pl.errors import RLMusicError
from rlmusic_pl.lora import load_lora
from rlmusic_pl.rewards.base import Reward, as_reward

FAMILIES = ("audioldm2", "musicgen")


class PreferenceSetError(RLMusicError, ValueError):
    """The settings of a preference set cannot be used; the message names the option."""


def load_judge(class_path: str, init_args: dict | None = None) -> Reward:
    """The reward at ``class_path`` (``package.module.Class``) built with ``init_args``."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise PreferenceSetError(f"--judge {class_path!r}: not an importable class path such as "
                                 f"rlmusic_pl.rewards.SpectralCentroidReward ({err})") from None
    try:
        judge = cls(**(init_args or {}))
    except TypeError as err:
        raise PreferenceSetError(f"--judge {class_path}: cannot be built with --judge-args {init_args} ({err})") from None
    return as_reward(judge, f"--judge {class_path}")


def preference_probability(score_a: Tensor, score_b: Tensor, temperature: float) -> Tensor:
    """Bradley-Terry probability that ``a`` is preferred to ``b``: sigma((score_a - score_b) / T)."""
    return torch.sigmoid((score_a - score_b) / temperature)


def expected_agreement(gaps: Tensor, temperature: float) -> float:
    """Mean probability that a label sampled at ``temperature`` agrees with the noise-free ranking of score gaps."""
    return preference_probability(gaps.abs(), torch.zeros_like(gaps), temperature).mean().item()


def temperature_for_agreement(gaps: Tensor, agreement: float) -> float:
    """The temperature whose expected agreement on ``gaps`` is ``agreement`` (bisection in log T)."""
    if not 0.5 < agreement < 1.0:
        raise PreferenceSetError(f"--agreement must be in (0.5, 1), got {agreement}")
    gaps = gaps.abs()
    if not (gaps > 0).any():
        raise PreferenceSetError("the judge gave every clip of a prompt the same score: no temperature can reach an agreement above 0.5")
    low, high = -30.0, 30.0  # log temperature; agreement falls as T grows
    for _ in range(200):
        middle = (low + high) / 2
        if expected_agreement(gaps, float(torch.tensor(middle).exp())) > agreement:
            low = middle
        else:
            high = middle
    return float(torch.tensor((low + high) / 2).exp())


def label_pairs(scores: Tensor, groups: list[list[int]], temperature: float, generator: torch.Generator) -> list[tuple[int, int]]:
    """(chosen, rejected) clip indices for every pair within each group, sampled from the Bradley-Terry model."""
    pairs = [pair for group in groups for pair in itertools.combinations(group, 2)]
    a = torch.tensor([i for i, _ in pairs])
    b = torch.tensor([j for _, j in pairs])
    a_wins = torch.rand(len(pairs), generator=generator) < preference_probability(scores[a], scores[b], temperature)
    return [(i, j) if win else (j, i) for (i, j), win in zip(pairs, a_wins.tolist())]


class ClipGenerator:
    """Generates clips of prompts with one backbone (and adapter), seeded, in batches.

    Args:
        family: ``audioldm2`` or ``musicgen``.
        backbone: hub id, local directory or ``tiny``.
        adapter: optional adapter directory (as exported by the fit runs) loaded onto the backbone.
        duration_s: seconds per clip.
        num_steps: DDIM steps (AudioLDM2).
        guidance_scale: classifier-free guidance scale.
        eta: DDIM stochasticity (AudioLDM2).
        batch_size: clips per generation batch.
    """

    def __init__(self, family: str, backbone: str, adapter: str | None = None, duration_s: float = 2.0, num_steps: int = 10,
                 guidance_scale: float = 3.5, eta: float = 1.0, batch_size: int = 8, device: str = "cpu") -> None:
        if family not in FAMILIES:
            raise PreferenceSetError(f"--family must be one of {FAMILIES}, got {family!r}")
        if family == "audioldm2":
            from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone
            self.backbone = AudioLDM2Backbone.load(backbone)
            network = self.backbone.unet
        else:
            from rlmusic_pl.backbone.musicgen import MusicGenBackbone
            self.backbone = MusicGenBackbone.load(backbone)
            network = self.backbone.decoder
        if adapter:
            load_lora(network, adapter)
        self.backbone.to(device)
        self.family, self.duration_s, self.num_steps = family, duration_s, num_steps
        self.guidance_scale, self.eta, self.batch_size = guidance_scale, eta, batch_size

    @property
    def sample_rate(self) -> int:
        return self.backbone.sample_rate

    @torch.no_grad()
    def generate(self, prompts: list[str], negative_prompts: list[str], generator: torch.Generator) -> Tensor:
        """Waveforms [len(prompts), T], one clip per prompt, batch by batch."""
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            part, negative = prompts[start : start + self.batch_size], negative_prompts[start : start + self.batch_size]
            if self.family == "audioldm2":
                cond = self.backbone.encode_prompts(part, negative)
                noise = self.backbone.initial_latents(len(part), self.duration_s, generator)
                result = self.backbone.sample(cond, noise, self.num_steps, self.guidance_scale, self.eta, generator)
                chunks.append(self.backbone.decode(result.final, self.duration_s))
            else:
                cond = self.backbone.encode_prompts(part)
                codes = self.backbone.sample(cond, self.backbone.num_frames(self.duration_s), self.guidance_scale, generator=generator).codes
                chunks.append(self.backbone.decode(codes))
        return torch.cat(chunks).float().cpu()


def make_preference_set(
    out: str | Path,
    items: list[PromptItem],
    clips: ClipGenerator,
    judge: Reward,
    clips_per_prompt: int = 4,
    temperature: float | None = None,
    agreement: float | None = None,
    seed: int = 0,
) -> dict:
    """Generate, judge and label a preference set under ``out`` (see the module doc); its summary."""
    if clips_per_prompt < 2:
        raise PreferenceSetError(f"--clips-per-prompt must be at least 2 to make pairs, got {clips_per_prompt}")
    if (temperature is None) == (agreement is None):
        raise PreferenceSetError("give exactly one of --temperature and --agreement")
    if temperature is not None and temperature <= 0:
        raise PreferenceSetError(f"--temperature must be > 0, got {temperature}")
    out = Path(out)
    expanded = [item for item in items for _ in range(clips_per_prompt)]
    prompts = [item["prompt"] for item in expanded]
    generator = torch.Generator().manual_seed(seed)
    waveforms = clips.generate(prompts, [item.get("negative_prompt", "") for item in expanded], generator)
    scores = judge.evaluate(waveforms, clips.sample_rate, prompts, [item["attributes"] for item in expanded]).total.cpu()
    groups = [list(range(i * clips_per_prompt, (i + 1) * clips_per_prompt)) for i in range(len(items))]
    gaps = torch.tensor([scores[i] - scores[j] for group in groups for i, j in itertools.combinations(group, 2)])
    if temperature is None:
        temperature = temperature_for_agreement(gaps, agreement)
    labelled = label_pairs(scores, groups, temperature, torch.Generator().manual_seed(seed + 1))
    names = [f"clips/p{index // clips_per_prompt:04d}_c{index % clips_per_prompt:02d}.wav" for index in range(len(expanded))]
    for name, wave in zip(names, waveforms):
        write_wav(out / name, wave, clips.sample_rate)
    pairs = [{"prompt": prompts[i], "chosen": names[i], "rejected": names[j], **expanded[i]["attributes"]} for i, j in labelled]
    agree = sum(bool(scores[i] > scores[j]) for i, j in labelled) / len(labelled)
    summary = {
        "pairs": len(pairs), "prompts": len(items), "clips_per_prompt": clips_per_prompt, "judge": judge.name,
        "temperature": temperature, "expected_agreement": expected_agreement(gaps, temperature), "sampled_agreement": agree,
        "seed": seed, "sample_rate": clips.sample_rate,
    }
    _write_lines(out / "pairs.jsonl", pairs)
    _write_lines(out / "clips.jsonl", [{"file": name, "prompt": prompt, "judge": float(score)}
                                       for name, prompt, score in zip(names, prompts, scores)])
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def _write_lines(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlmusic_pl make-preferences",
        description="Make a synthetic preference set: generate k clips per prompt with a backbone (and adapter), score "
        "them with a judge reward, and label every pair of a prompt's clips by sampling from a Bradley-Terry model of "
        "the judge's scores, P(a > b) = sigmoid((judge(a) - judge(b)) / T). Writes OUT/clips/*.wav, OUT/pairs.jsonl "
        "(for PreferencePairs), OUT/clips.jsonl (judge scores) and OUT/summary.json. Exit status 2 for bad settings.",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the option for several)")
    parser.add_argument("--prompt-file", help="a .txt, .jsonl or .csv prompt file (as the data module reads)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt of prompts that set none (default: empty)")
    parser.add_argument("--family", choices=FAMILIES, default="audioldm2", help="the backbone's kind (default: %(default)s)")
    parser.add_argument("--backbone", default="tiny", help="hub id, local directory, or 'tiny' (default: %(default)s)")
    parser.add_argument("--adapter", help="adapter directory to load onto the backbone (a fit run's <run dir>/adapter)")
    parser.add_argument("--clips-per-prompt", "-k", type=int, default=4, help="clips per prompt; all their pairs are labelled (default: %(default)s)")
    parser.add_argument("--judge", default="rlmusic_pl.rewards.SpectralCentroidReward",
                        help="class path of the judge reward (default: %(default)s)")
    parser.add_argument("--judge-args", default="{}", help="the judge's constructor arguments as JSON (default: %(default)s)")
    parser.add_argument("--temperature", type=float, help="Bradley-Terry temperature T of the labels (in judge-score units)")
    parser.add_argument("--agreement", type=float,
                        help="instead of --temperature: choose T so that labels agree with the judge's noise-free ranking this often, e.g. 0.85")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per clip (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per clip, AudioLDM2 (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=3.5, help="classifier-free guidance scale (default: %(default)s)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity, AudioLDM2 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per generation batch (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips' noise and of the labels (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m rlmusic_pl make-preferences``: returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        items = [parse_entry(prompt, f"--prompt[{index}]") for index, prompt in enumerate(args.prompt)]
        if args.prompt_file:
            items += load_prompt_file(args.prompt_file)
        if not items:
            raise PromptError("no prompts: give --prompt (repeatable) or --prompt-file")
        items = [{"negative_prompt": args.negative_prompt, **item} for item in items]
        try:
            judge_args = json.loads(args.judge_args)
        except json.JSONDecodeError as err:
            raise PreferenceSetError(f"--judge-args is not JSON ({err.msg}): {args.judge_args!r}") from None
        judge = load_judge(args.judge, judge_args)
        clips = ClipGenerator(args.family, args.backbone, args.adapter, args.duration, args.steps, args.guidance_scale,
                              args.eta, args.batch_size, args.device)
        summary = make_preference_set(args.out, items, clips, judge, args.clips_per_prompt, args.temperature, args.agreement, args.seed)
    except RLMusicError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['pairs']} pairs of {summary['prompts']} prompts x {summary['clips_per_prompt']} clips to {args.out}: "
          f"temperature {summary['temperature']:.4g}, labels agree with the judge's ranking "
          f"{summary['sampled_agreement']:.1%} (expected {summary['expected_agreement']:.1%})")
    return 0
