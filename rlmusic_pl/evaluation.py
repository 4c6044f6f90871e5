"""Evaluation metrics of generated music: CLAP similarity and emotion accuracy (seed 001, Tables 1 and 2),
and the SSIM of two clips' mel spectrograms (how far a slider moved a clip from the base model's).

``MusicEvaluator`` is an ``nn.Module`` of torchmetrics, so it follows its LightningModule's device
and its states are summed over DDP ranks when computed. It depends on no LightningModule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassStatScores

from rlmusic_pl.rewards.base import Reward
from rlmusic_pl.rewards.clap import CLAPReward
from rlmusic_pl.rewards.emotion import EMOTIONS, EmotionReward, emotion_index


class MusicEvaluator(nn.Module):
    """Accumulates seed 001's evaluation over batches of generated clips.

    ``compute()`` returns, for what it was given:

    - ``clap_similarity``: mean CLAP text-audio cosine similarity (Table 2, "CLAP (similarity)");
    - ``emotion_accuracy``: fraction of emotion prompts whose clip the classifier assigns to the
      prompt's emotion (Table 2, "EMOPIA (accuracy)"), over every prompt with an emotion attribute;
    - ``emotion_accuracy/<emotion>``: the same per target emotion (Table 1), for emotions that
      occurred (an emotion without prompts has no accuracy, rather than a misleading 0).

    Args:
        clap: the CLAP model that scores text-audio similarity (None: not reported).
        emotion: the emotion classifier; its ``attribute`` names the prompt attribute holding the
            target emotion, and prompts without it are left out of the accuracy (None: not reported).
    """

    def __init__(self, clap: CLAPReward | None = None, emotion: EmotionReward | None = None) -> None:
        super().__init__()
        self.clap = clap
        self.emotion = emotion
        self.clap_similarity = MeanMetric()
        # tp/fp/tn/fn/support per class: accuracy per class is tp / support (seed 001's Table 1).
        self.emotion_stats = MulticlassStatScores(num_classes=len(EMOTIONS), average=None)

    @classmethod
    def from_rewards(cls, rewards: list[Reward]) -> MusicEvaluator:
        """An evaluator sharing (not copying) the first CLAPReward and EmotionReward among ``rewards``."""
        clap = next((r for r in rewards if isinstance(r, CLAPReward)), None)
        emotion = next((r for r in rewards if isinstance(r, EmotionReward)), None)
        return cls(clap=clap, emotion=emotion)

    @torch.no_grad()
    def update(self, waveforms: Tensor, sample_rate: int, prompts: list[str], attributes: list[dict[str, str]]) -> None:
        """Add a batch of clips [B, T] at ``sample_rate`` with their prompts and attributes."""
        if self.clap is not None:
            self.clap_similarity.update(self.clap.evaluate(waveforms, sample_rate, prompts, attributes).total)
        if self.emotion is not None:
            targets = [emotion_index(a.get(self.emotion.attribute, "")) for a in attributes]
            keep = [i for i, target in enumerate(targets) if target is not None]
            if keep:
                predicted = self.emotion.predict(waveforms[keep], sample_rate)
                target = torch.tensor([targets[i] for i in keep], device=predicted.device)
                self.emotion_stats.update(predicted, target)

    def compute(self) -> dict[str, Tensor]:
        """The metrics accumulated since the last ``reset`` (summed over DDP ranks)."""
        results: dict[str, Tensor] = {}
        if self.clap is not None and self.clap_similarity.update_called:
            results["clap_similarity"] = self.clap_similarity.compute()
        if self.emotion is not None and self.emotion_stats.update_called:
            stats = self.emotion_stats.compute()
            correct, support = stats[:, 0].float(), stats[:, 4].float()
            results["emotion_accuracy"] = correct.sum() / support.sum()
            for index, name in enumerate(EMOTIONS):
                if support[index] > 0:
                    results[f"emotion_accuracy/{name}"] = correct[index] / support[index]
        return results

    def reset(self) -> None:
        self.clap_similarity.reset()
        self.emotion_stats.reset()
