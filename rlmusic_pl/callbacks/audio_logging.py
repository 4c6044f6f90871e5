"""Generated clips and their mel spectrograms to TensorBoard, labelled with prompt, strength and reward."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from rlmusic_pl.callbacks.samples import SampleBatch
from rlmusic_pl.callbacks.tensorboard import logging_step, samples_from, tensorboard_writer
from rlmusic_pl.data.audio import AUDIOLDM_MEL, log_mel, resample


class AudioLogger(Callback):
    """Write up to ``max_clips`` of the samples in ``outputs["samples"]`` to TensorBoard.

    Every ``every_n_steps`` training steps (counted like Lightning's logging step: batches that
    stepped the optimizer, from 0, so the first samples are logged too), and on the first batch of
    each validation and test epoch: ``{stage}/audio/{i}`` (audio at the samples' rate), ``{stage}/mel/{i}`` (log-mel
    at 16 kHz, scaled to [0, 1], low frequencies at the bottom) and a table ``{stage}/samples``
    with each clip's prompt, strength and total reward. Only on global rank 0; does nothing
    without a TensorBoard logger.

    Args:
        every_n_steps: training steps between two logs.
        max_clips: most clips written per log.
        log_mel: also write mel-spectrogram images.
    """

    def __init__(self, every_n_steps: int = 50, max_clips: int = 4, log_mel: bool = True) -> None:
        if every_n_steps < 1 or max_clips < 1:
            raise ValueError(f"AudioLogger: every_n_steps and max_clips must be >= 1, got {every_n_steps} and {max_clips}")
        self.every_n_steps = every_n_steps
        self.max_clips = max_clips
        self.log_mel = log_mel
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = logging_step(trainer)
        # Several batches share a step under gradient accumulation: log the first only.
        if step % self.every_n_steps == 0 and step != self._last_step:
            if self._write(trainer, "train", samples_from(outputs)):
                self._last_step = step

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._write(trainer, "val", samples_from(outputs))

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._write(trainer, "test", samples_from(outputs))

    def _write(self, trainer: Trainer, stage: str, samples: SampleBatch | None) -> bool:
        writer = tensorboard_writer(trainer)
        if samples is None or writer is None or not trainer.is_global_zero or trainer.sanity_checking:
            return False
        step = logging_step(trainer)
        waves = samples.waveforms[: self.max_clips].detach().float().cpu().clamp(-1.0, 1.0)
        for index, wave in enumerate(waves):
            writer.add_audio(f"{stage}/audio/{index}", wave, step, sample_rate=samples.sample_rate)
        if self.log_mel:
            mels = log_mel(resample(waves, samples.sample_rate, AUDIOLDM_MEL.sample_rate), AUDIOLDM_MEL)
            for index, mel in enumerate(mels):
                writer.add_image(f"{stage}/mel/{index}", mel_image(mel), step, dataformats="HW")
        writer.add_text(f"{stage}/samples", sample_table(samples, len(waves)), step)
        return True


def mel_image(mel: Tensor) -> Tensor:
    """A log-mel [frames, n_mels] as an image [n_mels, frames] in [0, 1], low frequencies at the bottom."""
    image = mel.T.flip(0)
    low, high = image.min(), image.max()
    return (image - low) / (high - low).clamp(min=1e-8)


def sample_table(samples: SampleBatch, count: int) -> str:
    """Markdown table of the first ``count`` clips: index, prompt, strength and total reward where known."""
    reward = samples.rewards.get("total")
    if reward is None and len(samples.rewards) == 1:
        reward = next(iter(samples.rewards.values()))
    header = ["clip", "prompt"] + ["strength"] * (samples.strengths is not None) + ["reward"] * (reward is not None)
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index in range(count):
        cells = [str(index), samples.prompts[index].replace("|", "\\|")]
        if samples.strengths is not None:
            cells.append(f"{float(samples.strengths[index]):.3g}")
        if reward is not None:
            cells.append(f"{float(reward[index]):.4g}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
