"""PromptAttributeDataModule: the one data module of the DDPO, slider (Stage 1) and scale-PPO (Stage 2) modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from rlmusic_pl.data.contrast import ContrastDataset, ContrastSets
from rlmusic_pl.data.preferences import PreferenceDataset, PreferencePairs
from rlmusic_pl.data.prompts import PromptError, PromptItem, expand_template, load_prompt_file, parse_entry

SPLITS = ("train", "val", "test", "predict")


def collate_items(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate items into a batch with the same keys: tensors are stacked, every other value becomes a list."""
    keys = list(items[0])
    for item in items:
        if list(item) != keys:
            raise ValueError(f"cannot collate items with different keys: {keys} and {list(item)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = values
            continue
        try:
            batch[key] = torch.stack(values)
        except RuntimeError:
            raise ValueError(f"cannot stack {key!r}: shapes {sorted({tuple(v.shape) for v in values})}") from None
    return batch


class PromptAttributeDataModule(LightningDataModule):
    """Prompt/attribute pairs for training, validation, testing and prediction.

    Prompts come from an inline list, a template expanded over lists of values, a prompt file, or any
    combination; they are concatenated in that order and duplicates are kept (a repeated prompt is
    drawn more often). Each item is ``{"prompt": str, "negative_prompt": str, "attributes": dict[str, str]}``
    and a batch holds the same keys with list values (``collate_items``).

    The train/val/test split is a seeded random permutation (each split keeps the original order);
    the training order is reshuffled every epoch from the same seed, so runs repeat exactly.
    ``predict`` yields all prompts in their original order.

    Subclasses extend the data by overriding ``build_items`` (which items there are) or
    ``build_dataset`` (what a split's items become, e.g. items carrying contrasting audio).

    Args:
        prompts: Inline prompts: strings, or mappings ``{"prompt": ..., "attributes": {...}}`` with an
            optional ``negative_prompt``; other keys of a mapping are attributes too.
        template: A prompt template with ``{name}`` placeholders, e.g.
            ``"A recording of a {emotion} {instrument} solo, high quality"``.
        template_values: The values of each template placeholder, e.g. ``{"emotion": ["happy", "sad"]}``.
            The template is expanded over their cartesian product (first placeholder slowest), and
            each prompt's attributes are the values chosen for it.
        prompt_file: A ``.txt`` file (one prompt per line; blank lines and ``#`` comments skipped), a
            ``.jsonl`` file (one object per line, like an inline mapping) or a ``.csv`` file (a ``prompt``
            column, an optional ``negative_prompt`` column where an empty cell keeps the default, and
            any other columns as attributes).
        negative_prompt: The negative prompt of every item that does not set its own.
        val_fraction: Fraction of the prompts held out for validation (rounded, at least one when
            positive). With 0, validation uses all prompts, so a run on four prompts still validates on them.
        test_fraction: Fraction of the prompts held out for testing, as ``val_fraction``; with 0,
            testing uses all prompts.
        batch_size: Items per batch.
        seed: Seed of the split and of the training order.
        num_workers: DataLoader worker processes (0 loads in the main process).
        repeats: How many times the training prompts repeat per epoch, so that a short prompt list
            makes a longer epoch.
        contrast: Contrasting sets of one attribute for the Stage-1 slider (``ContrastSets`` or
            ``SyntheticContrastSets``). Each training item then also holds ``positive_mel`` and
            ``negative_mel`` (log-mel segments [frames, 64]) and ``contrast`` (the attribute and its
            sides' labels); an epoch covers every prompt and every pair (see ``ContrastDataset``).
        preferences: Pairwise preferences (``PreferencePairs``: a JSONL/CSV of prompt, chosen and
            rejected clips). The items are then the pairs instead of prompts (give no other prompt
            source), split into train/val/test by the fractions; each also holds ``chosen_audio`` and
            ``rejected_audio`` (waveforms [samples]), ``tie`` and the clips' paths (see ``PreferenceDataset``).
    """

    def __init__(
        self,
        prompts: list[str | dict[str, Any]] | None = None,
        template: str | None = None,
        template_values: dict[str, list[str]] | None = None,
        prompt_file: str | None = None,
        negative_prompt: str = "",
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        batch_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        repeats: int = 1,
        contrast: ContrastSets | None = None,
        preferences: PreferencePairs | None = None,
    ) -> None:
        super().__init__()
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise PromptError(f"{name} must be in [0, 1), got {fraction}")
        for name, count in (("batch_size", batch_size), ("repeats", repeats)):
            if count < 1:
                raise PromptError(f"{name} must be at least 1, got {count}")
        if template_values and template is None:
            raise PromptError("template_values given without a template")
        # Not logged: Lightning refuses a model and a data module whose hparams share a key (``seed``) with
        # different values; LightningCLI's config.yaml and the checkpoint still record them.
        self.save_hyperparameters(ignore=["contrast", "preferences"], logger=False)
        self.contrast = contrast
        self.preferences = preferences
        self.items: list[PromptItem] | None = None
        self.splits: dict[str, list[PromptItem]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the prompts and split them, once: later calls do nothing."""
        if self.splits is None:
            self.items = self.build_items()
            self.splits = self.split_items(self.items)

    def split(self, name: str) -> list[PromptItem]:
        """The items of one split: ``"train"`` (without repeats), ``"val"``, ``"test"`` or ``"predict"``."""
        self.setup()
        return self.splits[name]

    def build_items(self) -> list[PromptItem]:
        """All items from the configured sources, in order, each with its negative prompt."""
        hp = self.hparams
        sources: list[str] = []
        items: list[PromptItem] = []
        if hp.prompts is not None:
            sources.append("prompts")
            items += [parse_entry(entry, f"prompts[{index}]") for index, entry in enumerate(hp.prompts)]
        if hp.template is not None:
            sources.append("template")
            items += expand_template(hp.template, hp.template_values)
        if hp.prompt_file is not None:
            sources.append(f"prompt_file {hp.prompt_file}")
            items += load_prompt_file(hp.prompt_file)
        if self.preferences is not None:
            if sources:
                raise PromptError(f"preferences given with {', '.join(sources)}: the items are then the pairs, give no other prompt source")
            sources.append(f"preferences {self.preferences.path}")
            items = self.preferences.items()
        if not sources:
            raise PromptError("no prompt source: set prompts, template (with template_values) or prompt_file")
        if not items:
            raise PromptError(f"empty prompt list: {', '.join(sources)} gave no prompts")
        return [{**item, "negative_prompt": item.get("negative_prompt", hp.negative_prompt)} for item in items]

    def split_items(self, items: list[PromptItem]) -> dict[str, list[PromptItem]]:
        """Split ``items`` by a seeded permutation; an empty val or test split falls back to all items."""
        count = len(items)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        n_val = _held_out(self.hparams.val_fraction, count)
        n_test = _held_out(self.hparams.test_fraction, count)
        if n_val + n_test >= count:
            raise PromptError(
                f"val_fraction={self.hparams.val_fraction} and test_fraction={self.hparams.test_fraction} "
                f"hold out {n_val + n_test} of {count} prompts, leaving none for training"
            )

        def pick(indices: list[int]) -> list[PromptItem]:
            return [items[index] for index in sorted(indices)] or items

        return {
            "train": pick(order[n_val + n_test :]),
            "val": pick(order[:n_val]),
            "test": pick(order[n_val : n_val + n_test]),
            "predict": items,
        }

    def build_dataset(self, items: list[PromptItem], split: str) -> Dataset:
        """The dataset of one split (``split`` is one of SPLITS); override to attach more to each item."""
        if self.preferences is not None:
            return PreferenceDataset(items, self.preferences)
        if self.contrast is not None and split == "train":
            return ContrastDataset(items, self.contrast.pairs(), self.contrast.labels())
        return items  # a list is a map-style dataset

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.split("train") * self.hparams.repeats, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.split("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.split("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.split("predict"))

    def _loader(self, split: str, items: list[PromptItem], shuffle: bool = False) -> DataLoader:
        dataset = self.build_dataset(items, split)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.hparams.seed) if shuffle else None,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_items,
        )


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run sees the orders it would have seen.

    Lightning calls ``set_epoch`` at the start of every epoch (and replaces this sampler by a
    ``DistributedSampler``, which works the same way, under DDP).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def _held_out(fraction: float, count: int) -> int:
    return max(1, round(fraction * count)) if fraction > 0 else 0
