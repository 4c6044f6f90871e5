"""PromptAttributeDataModule: sources, items and batches, splits, determinism, errors, CLI parsing."""

import pytest
import torch
from jsonargparse import ArgumentParser

from rlmusic_pl.data import PromptAttributeDataModule, PromptError, collate_items

EMOTIONS = {"emotion": ["happy", "angry", "sad", "tender"]}
TEMPLATE = "A recording of a {emotion} piano solo, high quality"


def prompts_of(batches):
    return [prompt for batch in batches for prompt in batch["prompt"]]


def numbered(count):
    return [f"prompt {index}" for index in range(count)]


def test_sources_combine_in_order_with_negative_prompts(tmp_path):
    prompt_file = tmp_path / "p.csv"
    prompt_file.write_text("prompt,instrument\nsolo cello,cello\n", encoding="utf-8")
    data = PromptAttributeDataModule(
        prompts=["inline", {"prompt": "own negative", "negative_prompt": "hiss", "attributes": {"emotion": "sad"}}],
        template=TEMPLATE,
        template_values={"emotion": ["happy", "sad"]},
        prompt_file=str(prompt_file),
        negative_prompt="Low quality, multiple sound sources",
        batch_size=5,
    )
    batch = next(iter(data.predict_dataloader()))
    assert batch == {
        "prompt": ["inline", "own negative", TEMPLATE.format(emotion="happy"), TEMPLATE.format(emotion="sad"), "solo cello"],
        "negative_prompt": ["Low quality, multiple sound sources", "hiss"] + ["Low quality, multiple sound sources"] * 3,
        "attributes": [{}, {"emotion": "sad"}, {"emotion": "happy"}, {"emotion": "sad"}, {"instrument": "cello"}],
    }


def test_without_held_out_fractions_every_split_uses_all_prompts():
    data = PromptAttributeDataModule(template=TEMPLATE, template_values=EMOTIONS, batch_size=3)
    everything = [TEMPLATE.format(emotion=emotion) for emotion in EMOTIONS["emotion"]]
    assert prompts_of(data.val_dataloader()) == everything
    assert prompts_of(data.test_dataloader()) == everything
    assert prompts_of(data.predict_dataloader()) == everything
    assert sorted(prompts_of(data.train_dataloader())) == sorted(everything)


def test_splits_are_disjoint_seeded_and_cover_all_prompts():
    data = PromptAttributeDataModule(prompts=numbered(20), val_fraction=0.2, test_fraction=0.1, seed=3)
    data.setup("fit")
    names = {split: [item["prompt"] for item in data.split(split)] for split in ("train", "val", "test")}
    assert [len(names[split]) for split in ("train", "val", "test")] == [14, 4, 2]
    assert sorted(sum(names.values(), []), key=lambda p: int(p.split()[1])) == numbered(20)
    assert names["val"] == sorted(names["val"], key=lambda p: int(p.split()[1]))  # splits keep file order
    same = PromptAttributeDataModule(prompts=numbered(20), val_fraction=0.2, test_fraction=0.1, seed=3)
    other = PromptAttributeDataModule(prompts=numbered(20), val_fraction=0.2, test_fraction=0.1, seed=4)
    assert [item["prompt"] for item in same.split("val")] == names["val"]
    assert [item["prompt"] for item in other.split("val")] != names["val"]
    assert len(PromptAttributeDataModule(prompts=numbered(4), val_fraction=0.1).split("val")) == 1  # at least one


def test_training_order_is_seeded_reshuffled_each_epoch_and_repeated():
    def epochs(seed):
        loader = PromptAttributeDataModule(prompts=numbered(10), batch_size=4, seed=seed, repeats=3).train_dataloader()
        orders = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does
            orders.append(prompts_of(loader))
        return orders

    first, second = epochs(seed=0)
    assert len(first) == 30 and sorted(first) == sorted(numbered(10) * 3)
    assert first != second  # a new order every epoch
    assert epochs(seed=0) == [first, second]  # the same orders in every run
    assert epochs(seed=1)[0] != first


def test_resumed_epoch_sees_the_order_of_an_uninterrupted_run():
    uninterrupted = PromptAttributeDataModule(prompts=numbered(10), seed=3).train_dataloader()
    uninterrupted.sampler.set_epoch(0)
    prompts_of(uninterrupted)
    uninterrupted.sampler.set_epoch(1)
    resumed = PromptAttributeDataModule(prompts=numbered(10), seed=3).train_dataloader()
    resumed.sampler.set_epoch(1)
    assert prompts_of(resumed) == prompts_of(uninterrupted)


def test_setup_is_idempotent():
    data = PromptAttributeDataModule(prompts=numbered(5), val_fraction=0.2)
    data.setup("fit")
    splits = data.splits
    data.setup("validate")
    data.setup("test")
    assert data.splits is splits


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "no prompt source: set prompts, template"),
        ({"prompts": []}, "empty prompt list: prompts gave no prompts"),
        ({"prompts": ["a", {"prompt": "b", "attributes": {"tempo": 120}}]}, "prompts[1]: attribute 'tempo' must be a string"),
        ({"prompts": ["a", {"text": "b"}]}, "prompts[1]: missing or empty 'prompt'"),
        ({"template": "{emotion} {instrument}", "template_values": EMOTIONS}, "{instrument} has no values"),
        ({"prompt_file": "missing/prompts.txt"}, "prompt file not found: missing/prompts.txt"),
        ({"prompts": ["a", "b"], "val_fraction": 0.5, "test_fraction": 0.5}, "hold out 2 of 2 prompts, leaving none"),
    ],
)
def test_bad_sources_fail_at_setup_with_a_clear_error(arguments, message):
    data = PromptAttributeDataModule(**arguments)
    with pytest.raises(PromptError) as error:
        data.setup("fit")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
        ({"test_fraction": -0.1}, "test_fraction must be in [0, 1)"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"template_values": EMOTIONS}, "template_values given without a template"),
    ],
)
def test_bad_arguments_fail_at_construction(arguments, message):
    with pytest.raises(PromptError) as error:
        PromptAttributeDataModule(prompts=["a"], **arguments)
    assert message in str(error.value)


def test_collate_stacks_tensors_and_lists_everything_else():
    items = [{"prompt": "a", "attributes": {"k": "v"}, "mel": torch.zeros(3, 2)} for _ in range(2)]
    batch = collate_items(items)
    assert batch["prompt"] == ["a", "a"] and batch["attributes"] == [{"k": "v"}] * 2
    assert batch["mel"].shape == (2, 3, 2)
    with pytest.raises(ValueError, match="different keys"):
        collate_items([items[0], {"prompt": "b"}])
    with pytest.raises(ValueError, match="cannot stack 'mel'"):
        collate_items([items[0], {**items[1], "mel": torch.zeros(4, 2)}])


def test_build_dataset_is_the_extension_point():
    class WithMel(PromptAttributeDataModule):
        def build_dataset(self, items, split):
            return [{**item, "mel": torch.full((2, 3), float(index))} for index, item in enumerate(items)]

    batch = next(iter(WithMel(prompts=numbered(3), batch_size=3).val_dataloader()))
    assert batch["prompt"] == numbered(3)
    assert torch.equal(batch["mel"][:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))


def test_configurable_from_yaml_like_lightning_cli():
    parser = ArgumentParser()
    parser.add_class_arguments(PromptAttributeDataModule, "data")
    config = parser.parse_string(
        "data:\n"
        "  prompts: [plain, {prompt: tagged, attributes: {emotion: sad}}]\n"
        "  template: 'A {emotion} piano'\n"
        "  template_values: {emotion: [happy]}\n"
        "  negative_prompt: noise\n"
    )
    data = parser.instantiate(config).data
    assert [item["prompt"] for item in data.split("predict")] == ["plain", "tagged", "A happy piano"]
    assert data.hparams.negative_prompt == "noise"


def test_a_model_and_a_data_module_may_use_different_seeds_under_a_logger(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    class Seeded(L.LightningModule):
        def __init__(self, seed: int = 1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return self.weight.pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(Seeded(seed=1), PromptAttributeDataModule(prompts=numbered(4), batch_size=2, seed=0))
    assert trainer.global_step == 1
