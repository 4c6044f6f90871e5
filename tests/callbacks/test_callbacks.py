"""RewardLogger and AudioLogger in a real (tiny) Lightning run, read back from the TensorBoard event files."""

import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from rlmusic_pl.callbacks import AudioLogger, RewardLogger, SampleBatch
from rlmusic_pl.callbacks.audio_logging import mel_image, sample_table
from rlmusic_pl.data.audio import log_mel

SR = 16000
FREQS = (220.0, 440.0, 880.0)
ATTRIBUTES = [{"emotion": "happy"}, {"emotion": "sad"}, {"emotion": "happy"}]


def sines(freqs=FREQS, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs])


def rewards_for(batch_idx: int, stage: str) -> dict[str, torch.Tensor]:
    """Distinct known values per step and stage so each logged statistic can be checked."""
    offset = {"train": 0.0, "val": 10.0}[stage] + batch_idx
    clap = torch.tensor([0.1, 0.2, 0.6]) + offset
    return {"clap": clap, "total": 2 * clap}


class SamplingModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def samples(self, batch_idx: int, stage: str) -> SampleBatch:
        return SampleBatch(
            waveforms=sines(),
            sample_rate=SR,
            prompts=["a happy tune", "a sad | tune", "another happy tune"],
            attributes=ATTRIBUTES,
            rewards=rewards_for(batch_idx, stage),
            strengths=torch.tensor([0.0, 0.5, 1.0]),
        )

    def training_step(self, batch, batch_idx):
        return {"loss": (self.weight * batch[0]).pow(2).sum(), "samples": self.samples(batch_idx, "train")}

    def validation_step(self, batch, batch_idx):
        return {"samples": self.samples(batch_idx, "val")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=1)


def trainer_kwargs(**overrides):
    kwargs = dict(
        max_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=1,
        num_sanity_val_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="run")
    callbacks = [RewardLogger(), AudioLogger(every_n_steps=1, max_clips=2)]
    Trainer(logger=logger, callbacks=callbacks, **trainer_kwargs()).fit(SamplingModule())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "audio": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(events, tag):
    return {event.step: event.value for event in events.Scalars(tag)}


def test_train_reward_statistics_are_logged_each_step(events):
    mean = scalar_steps(events, "train/reward/clap_mean")
    assert mean == pytest.approx({0: 0.3, 1: 1.3})  # Lightning logs batch i at step i
    std = scalar_steps(events, "train/reward/total_std")
    assert std[0] == pytest.approx(torch.tensor([0.2, 0.4, 1.2]).std(correction=0).item())
    assert scalar_steps(events, "train/reward/clap/emotion=happy") == pytest.approx({0: 0.35, 1: 1.35})
    assert scalar_steps(events, "train/reward/clap/emotion=sad") == pytest.approx({0: 0.2, 1: 1.2})


def test_validation_statistics_cover_the_epoch_and_skip_the_sanity_check(events):
    all_values = torch.cat([rewards_for(0, "val")["clap"], rewards_for(1, "val")["clap"]])
    assert scalar_steps(events, "val/reward/clap_mean") == pytest.approx({1: all_values.mean().item()})
    assert scalar_steps(events, "val/reward/clap_std") == pytest.approx({1: all_values.std(correction=0).item()})
    assert scalar_steps(events, "val/reward/total/emotion=sad") == pytest.approx({1: 2 * (10.2 + 11.2) / 2})


def test_histograms_are_written(events):
    tags = events.Tags()["histograms"]
    assert {"train/reward/clap", "train/reward/total", "val/reward/clap", "val/reward/total"} <= set(tags)
    train = events.Histograms("train/reward/total")
    assert [h.step for h in train] == [0, 1]
    assert train[0].histogram_value.num == 3 and train[0].histogram_value.max == pytest.approx(1.2)
    assert events.Histograms("val/reward/clap")[0].histogram_value.num == 6


def test_audio_clips_and_mels_are_written_up_to_max_clips(events):
    tags = events.Tags()
    assert {"train/audio/0", "train/audio/1", "val/audio/0", "val/audio/1"} <= set(tags["audio"])
    assert "train/audio/2" not in tags["audio"]
    assert [a.step for a in events.Audio("train/audio/0")] == [0, 1]
    assert [a.step for a in events.Audio("val/audio/1")] == [1]  # once: the sanity check (step 0) is skipped
    clip = events.Audio("train/audio/1")[0]
    assert clip.sample_rate == SR and clip.length_frames == SR
    assert {"train/mel/0", "train/mel/1", "val/mel/0"} <= set(tags["images"])
    image = events.Images("train/mel/0")[0]
    assert image.height == 64 and image.width == log_mel(sines()[0]).shape[0]


def test_label_table_names_prompts_strengths_and_rewards(events):
    tensors = events.Tensors("train/samples/text_summary")
    text = tensors[0].tensor_proto.string_val[0].decode()
    assert "| clip | prompt | strength | reward |" in text
    assert "| 1 | a sad \\| tune | 0.5 | 0.4 |" in text
    assert "another happy tune" not in text  # max_clips=2


def test_mel_image_puts_low_frequencies_at_the_bottom():
    low, high = mel_image(log_mel(sines((200.0,))[0])), mel_image(log_mel(sines((6000.0,))[0]))
    assert low.shape[0] == 64 and low.min() == 0 and low.max() == 1
    assert low.mean(dim=1).argmax() > 48  # bottom quarter of the image
    assert high.mean(dim=1).argmax() < 16


def test_sample_table_without_strengths_uses_the_single_reward():
    samples = SampleBatch(sines((220.0,)), SR, ["p"], [{}], {"clap": torch.tensor([0.25])})
    assert sample_table(samples, 1).splitlines() == ["| clip | prompt | reward |", "|---|---|---|", "| 0 | p | 0.25 |"]


def test_callbacks_run_without_a_logger_and_without_samples():
    class NoSamples(SamplingModule):
        def validation_step(self, batch, batch_idx):
            return None

    callbacks = [RewardLogger(), AudioLogger(every_n_steps=1)]
    Trainer(logger=False, callbacks=callbacks, **trainer_kwargs(max_steps=1)).fit(NoSamples())


def test_sample_batch_rejects_mismatched_fields():
    with pytest.raises(ValueError, match=r"3 waveforms but \{'prompts': 2\}"):
        SampleBatch(sines(), SR, ["a", "b"], ATTRIBUTES, {"total": torch.zeros(3)})


def test_audio_logger_cadence_and_mel_switch(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    callbacks = [AudioLogger(every_n_steps=2, max_clips=1, log_mel=False)]
    Trainer(logger=logger, callbacks=callbacks, **trainer_kwargs(max_steps=3, limit_val_batches=0)).fit(SamplingModule())
    events = EventAccumulator(logger.log_dir, size_guidance={"audio": 0, "images": 0})
    events.Reload()
    assert [a.step for a in events.Audio("train/audio/0")] == [0, 2]
    assert events.Tags()["images"] == []
