"""Contrasting sets for one attribute (Stage 1): pairs of log-mel segments "with" and "without" it.

A set is a folder of audio files (any format soundfile reads, any rate and channel count; converted
in memory), of prepared features (``python -m rlmusic_pl prepare``: a ``manifest.jsonl`` and
``features/*.npy``), or of ``.npy`` / ``.pt`` log-mel arrays [frames, 64]. Every example is cut into
non-overlapping segments of ``segment_s`` seconds (a shorter example gives one segment padded with
the silence floor), and positive and negative segments are paired by a seeded permutation of each
set, cycling the smaller one: the same seed always gives the same pairs. With ``paired=True`` the
sets are matched examples instead (example i of one side is example i of the other, differing only in
the attribute, as Concept Sliders' image pairs): segment i goes with segment i, in one shared order.

``PromptAttributeDataModule(contrast=ContrastSets(...))`` adds a pair to every training item.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rlmusic_pl.data.audio import AUDIOLDM_MEL, AudioError
from rlmusic_pl.data.prepare import MANIFEST, DataFolderError, audio_features, list_files, read_manifest
from rlmusic_pl.data.synthetic import NEGATIVE, POSITIVE, write_contrast_sets

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".npy", ".pt")
SILENCE = math.log(1e-5)  # the log-mel floor: what padding adds


@dataclass
class MelSet:
    """The log-mels of one side ([frames, 64] arrays; memory-mapped when read from .npy) and their segments."""

    folder: Path
    mels: list[Any]
    segment_frames: int

    def __post_init__(self) -> None:
        self.segments = [(index, start) for index, mel in enumerate(self.mels)
                         for start in range(0, max(1, len(mel) // self.segment_frames) * self.segment_frames, self.segment_frames)]

    def segment(self, number: int) -> Tensor:
        index, start = self.segments[number]
        mel = torch.from_numpy(np.array(self.mels[index][start : start + self.segment_frames], dtype=np.float32))
        return torch.nn.functional.pad(mel, (0, 0, 0, self.segment_frames - len(mel)), value=SILENCE)


def _check_mel(mel: Any, where: str) -> Any:
    if mel.ndim != 2 or mel.shape[1] != AUDIOLDM_MEL.n_mels or mel.shape[0] == 0:
        raise DataFolderError(f"{where}: expected a log-mel array [frames, {AUDIOLDM_MEL.n_mels}], got shape {tuple(mel.shape)}")
    if not np.isfinite(mel).all():
        raise DataFolderError(f"{where}: the log-mel contains NaN or inf values")
    return mel


def _read_feature_file(path: Path) -> Any:
    try:
        mel = np.load(path, mmap_mode="r") if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True).numpy()
    except Exception as err:  # numpy and torch raise many types for unreadable files
        raise DataFolderError(f"{path}: not a readable {path.suffix} log-mel file ({err})") from err
    return _check_mel(mel, str(path))


def load_mel_set(folder: str | Path, segment_frames: int) -> MelSet:
    """Read one side from a prepared folder (manifest), or from feature files and audio files in it.

    Audio files that cannot be used (unreadable, silent, too short) are logged by name and skipped;
    a folder with no usable example is an error.
    """
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        mels = [_read_feature_file(folder / entry["features"]) for entry in read_manifest(folder)]
    else:
        mels = []
        for path in list_files(folder):
            if path.suffix.lower() in FEATURE_SUFFIXES:
                mels.append(_read_feature_file(path))
                continue
            try:
                mels.append(audio_features(path).numpy())
            except AudioError as err:
                log.warning("skipped %s", err)
    if not mels:
        raise DataFolderError(f"{folder}: holds no usable audio or log-mel example")
    return MelSet(folder, mels, segment_frames)


class ContrastPairs(Dataset):
    """(positive segment, negative segment) pairs, each a log-mel [segment_frames, 64].

    There are as many pairs as segments in the larger set; each set is visited in its own seeded
    order, the smaller one cyclically. ``paired``: the sets hold matched examples, so segment i of
    one side goes with segment i of the other (one seeded order for both; the sets must have the
    same segments).
    """

    def __init__(self, positive: MelSet, negative: MelSet, seed: int = 0, paired: bool = False) -> None:
        self.positive, self.negative = positive, negative
        generator = torch.Generator().manual_seed(seed)
        self.positive_order = torch.randperm(len(positive.segments), generator=generator).tolist()
        self.negative_order = torch.randperm(len(negative.segments), generator=generator).tolist()
        if paired:
            if positive.segments != negative.segments:
                raise DataFolderError(f"paired contrast sets {positive.folder} and {negative.folder} must hold matching examples "
                                      f"(as many, of the same lengths): got {len(positive.segments)} and {len(negative.segments)} segments")
            self.negative_order = self.positive_order

    def __len__(self) -> int:
        return max(len(self.positive_order), len(self.negative_order))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        positive = self.positive.segment(self.positive_order[index % len(self.positive_order)])
        negative = self.negative.segment(self.negative_order[index % len(self.negative_order)])
        return positive, negative


class ContrastSets:
    """Two sets of examples contrasting one attribute: with it (positive) and without it (negative).

    Args:
        positive: folder of the examples with the attribute: audio files, prepared features
            (``python -m rlmusic_pl prepare``) or ``.npy``/``.pt`` log-mels [frames, 64].
        negative: folder of the examples without the attribute, in the same forms.
        attribute: name of the attribute, e.g. ``intensity``.
        positive_value: label of the positive side, e.g. ``intense``.
        negative_value: label of the negative side, e.g. ``gentle``.
        segment_s: seconds per training segment (AudioLDM log-mels have 100 frames per second).
        seed: seed of the pairing of positive and negative segments.
        paired: the two folders hold matched examples (the n-th file of each, in name order, is the
            same music with and without the attribute): pair them one to one instead of at random.
    """

    def __init__(
        self,
        positive: str,
        negative: str,
        attribute: str = "attribute",
        positive_value: str = "with",
        negative_value: str = "without",
        segment_s: float = 2.0,
        seed: int = 0,
        paired: bool = False,
    ) -> None:
        if segment_s <= 0:
            raise ValueError(f"segment_s must be > 0, got {segment_s}")
        self.positive, self.negative = positive, negative
        self.attribute, self.positive_value, self.negative_value = attribute, positive_value, negative_value
        self.segment_s = segment_s
        self.seed = seed
        self.paired = paired
        self._pairs: ContrastPairs | None = None

    @property
    def segment_frames(self) -> int:
        return round(self.segment_s * AUDIOLDM_MEL.sample_rate / AUDIOLDM_MEL.hop_length)

    def labels(self) -> dict[str, str]:
        """The attribute and the labels of its two sides, carried by every training item."""
        return {"attribute": self.attribute, "positive": self.positive_value, "negative": self.negative_value}

    def pairs(self) -> ContrastPairs:
        """The pairs, read from the folders on first use."""
        if self._pairs is None:
            positive = load_mel_set(self.positive, self.segment_frames)
            negative = load_mel_set(self.negative, self.segment_frames)
            self._pairs = ContrastPairs(positive, negative, self.seed, self.paired)
            log.info("contrast sets: %d positive and %d negative segments of %g s", len(positive.segments), len(negative.segments), self.segment_s)
        return self._pairs


class SyntheticContrastSets(ContrastSets):
    """Generated bright vs dull notes (``rlmusic_pl.data.synthetic``), written to ``directory`` on first use.

    Args:
        directory: where the clips are written (``<directory>/bright``, ``<directory>/dull``);
            existing clips are reused.
        count: clips per side.
        duration_s: seconds per clip.
        segment_s: seconds per training segment.
        seed: seed of the clips and of the pairing.
        paired: pair each bright clip's segments with the dull clip of the same notes (the sets are
            written matched), instead of with random dull segments.
    """

    def __init__(self, directory: str = "runs/synthetic/brightness", count: int = 8, duration_s: float = 2.0,
                 segment_s: float = 1.0, seed: int = 0, paired: bool = False) -> None:
        super().__init__(str(Path(directory) / POSITIVE), str(Path(directory) / NEGATIVE), attribute="brightness",
                         positive_value=POSITIVE, negative_value=NEGATIVE, segment_s=segment_s, seed=seed, paired=paired)
        self.directory, self.count, self.duration_s = directory, count, duration_s

    def pairs(self) -> ContrastPairs:
        if self._pairs is None:
            write_contrast_sets(self.directory, self.count, self.duration_s, seed=self.seed)
        return super().pairs()


class ContrastDataset(Dataset):
    """Prompt items joined with contrast pairs: item ``i`` is prompt ``i`` and pair ``i`` (each cycling).

    Its length is the larger of the two, so an epoch sees every prompt and every pair. Each item is
    the prompt item plus ``positive_mel`` and ``negative_mel`` (Tensor [segment_frames, 64]) and
    ``contrast`` (the attribute and the labels of its sides).
    """

    def __init__(self, items: list[dict], pairs: ContrastPairs, labels: dict[str, str]) -> None:
        if not items:
            raise ValueError("ContrastDataset needs at least one prompt item")
        self.items, self.pairs, self.labels = items, pairs, labels

    def __len__(self) -> int:
        return max(len(self.items), len(self.pairs))

    def __getitem__(self, index: int) -> dict:
        positive, negative = self.pairs[index % len(self.pairs)]
        return {**self.items[index % len(self.items)], "contrast": dict(self.labels), "positive_mel": positive, "negative_mel": negative}
