"""Contrast sets: synthetic bright/dull sets, folders of audio or features, seeded pairing, data module items."""

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from rlmusic_pl.data import ContrastSets, PromptAttributeDataModule, SyntheticContrastSets
from rlmusic_pl.data.audio import load_audio
from rlmusic_pl.data.prepare import DataFolderError, prepare_folder
from rlmusic_pl.data.synthetic import write_contrast_sets
from rlmusic_pl.rewards import SpectralCentroidReward


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    write_contrast_sets(directory, count=3, duration_s=1.5, seed=0)
    return directory


def test_synthetic_sets_are_deterministic_and_differ_in_brightness(synthetic, tmp_path):
    positive, negative = write_contrast_sets(tmp_path / "again", count=3, duration_s=1.5, seed=0)
    assert (positive / "bright_001.wav").read_bytes() == (synthetic / "bright" / "bright_001.wav").read_bytes()
    other, _ = write_contrast_sets(tmp_path / "other", count=1, duration_s=1.5, seed=1)
    assert (other / "bright_000.wav").read_bytes() != (synthetic / "bright" / "bright_000.wav").read_bytes()
    centroid = SpectralCentroidReward()
    for index in range(3):
        bright = load_audio(synthetic / "bright" / f"bright_{index:03d}.wav")[None]
        dull = load_audio(synthetic / "dull" / f"dull_{index:03d}.wav")[None]
        assert centroid(bright, 16000, [""], [{}]) > 1.5 * centroid(dull, 16000, [""], [{}])


def test_audio_and_prepared_folders_give_the_same_pairs(synthetic, tmp_path):
    prepare_folder(synthetic / "bright", tmp_path / "bright", progress=False)
    from_audio = ContrastSets(str(synthetic / "bright"), str(synthetic / "dull"), segment_s=0.5, seed=3).pairs()
    from_features = ContrastSets(str(tmp_path / "bright"), str(synthetic / "dull"), segment_s=0.5, seed=3).pairs()
    assert len(from_audio) == len(from_features) == 9  # 3 clips x 3 segments of 0.5 s (150 frames each)
    for index in range(len(from_audio)):
        for a, b in zip(from_audio[index], from_features[index]):
            assert a.shape == (50, 64)
            torch.testing.assert_close(a, b)


def test_pairing_is_seeded_and_cycles_the_smaller_set(synthetic, tmp_path):
    negative = tmp_path / "negative"
    negative.mkdir()
    np.save(negative / "only.npy", np.full((120, 64), -3.0, np.float32))
    pairs = ContrastSets(str(synthetic / "bright"), str(negative), segment_s=0.5, seed=0).pairs()
    assert len(pairs) == 9  # the larger side; the 2 negative segments repeat
    assert all(torch.equal(pairs[i][1], pairs[i + 2][1]) for i in range(7))
    same = ContrastSets(str(synthetic / "bright"), str(negative), segment_s=0.5, seed=0).pairs()
    other = ContrastSets(str(synthetic / "bright"), str(negative), segment_s=0.5, seed=1).pairs()
    assert all(torch.equal(pairs[i][0], same[i][0]) for i in range(9))
    assert not all(torch.equal(pairs[i][0], other[i][0]) for i in range(9))


def test_paired_sets_match_each_bright_segment_with_the_dull_one_of_the_same_notes(synthetic, tmp_path):
    pairs = SyntheticContrastSets(str(synthetic), count=3, duration_s=1.5, segment_s=0.5, seed=0, paired=True).pairs()
    bright = ContrastSets(str(synthetic / "bright"), str(synthetic / "bright"), segment_s=0.5).pairs().positive
    dull = ContrastSets(str(synthetic / "dull"), str(synthetic / "dull"), segment_s=0.5).pairs().positive
    assert len(pairs) == 9
    for index in range(len(pairs)):
        number = pairs.positive_order[index]
        torch.testing.assert_close(pairs[index][0], bright.segment(number))
        torch.testing.assert_close(pairs[index][1], dull.segment(number))  # the same clip and segment, the dull side
    assert pairs.positive_order != sorted(pairs.positive_order)  # still shuffled (one order for both)
    negative = tmp_path / "negative"
    negative.mkdir()
    np.save(negative / "only.npy", np.full((120, 64), -3.0, np.float32))
    with pytest.raises(DataFolderError, match="must hold matching examples .*got 9 and 2 segments"):
        ContrastSets(str(synthetic / "bright"), str(negative), segment_s=0.5, paired=True).pairs()


def test_an_example_shorter_than_a_segment_is_padded_with_silence(tmp_path):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        torch.save(torch.zeros(30, 64), tmp_path / side / "x.pt")
    positive, _ = ContrastSets(str(tmp_path / "a"), str(tmp_path / "b"), segment_s=0.5).pairs()[0]
    assert positive.shape == (50, 64)
    assert torch.all(positive[:30] == 0) and torch.allclose(positive[30:], torch.tensor(np.log(1e-5), dtype=torch.float32))


def test_bad_folders_and_files_are_clear_errors(synthetic, tmp_path):
    good = str(synthetic / "bright")
    with pytest.raises(DataFolderError, match="no such folder"):
        ContrastSets(good, str(tmp_path / "missing")).pairs()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFolderError, match="holds no files"):
        ContrastSets(good, str(tmp_path / "empty")).pairs()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("no audio here")
    with pytest.raises(DataFolderError, match="no usable audio"):
        ContrastSets(good, str(tmp_path / "junk")).pairs()
    (tmp_path / "wrong").mkdir()
    np.save(tmp_path / "wrong" / "mel.npy", np.zeros((10, 80), np.float32))
    with pytest.raises(DataFolderError, match=r"mel\.npy: expected a log-mel array \[frames, 64\]"):
        ContrastSets(good, str(tmp_path / "wrong")).pairs()


def test_data_module_adds_pairs_to_training_items_only(synthetic):
    contrast = ContrastSets(str(synthetic / "bright"), str(synthetic / "dull"), attribute="brightness",
                            positive_value="bright", negative_value="dull", segment_s=0.5)
    data = PromptAttributeDataModule(prompts=["a", "b"], batch_size=4, contrast=contrast)
    batches = list(data.train_dataloader())
    assert sum(len(batch["prompt"]) for batch in batches) == 9  # max(2 prompts, 9 pairs)
    batch = batches[0]
    assert batch["positive_mel"].shape == batch["negative_mel"].shape == (4, 50, 64)
    assert batch["contrast"][0] == {"attribute": "brightness", "positive": "bright", "negative": "dull"}
    assert set(batch["prompt"]) <= {"a", "b"}
    assert set(next(iter(data.val_dataloader()))) == {"prompt", "negative_prompt", "attributes"}


def test_contrast_sets_are_built_from_a_config(tmp_path):
    parser = ArgumentParser()
    parser.add_class_arguments(PromptAttributeDataModule, "data")
    config = parser.parse_object({"data": {"prompts": ["a"], "contrast": {
        "class_path": "rlmusic_pl.data.SyntheticContrastSets",
        "init_args": {"directory": str(tmp_path / "syn"), "count": 2, "duration_s": 1.0, "segment_s": 0.5}}}})
    data = parser.instantiate_classes(config).data
    assert isinstance(data.contrast, SyntheticContrastSets)
    assert len(data.contrast.pairs()) == 4 and (tmp_path / "syn" / "dull" / "dull_001.wav").is_file()


def test_a_feature_file_with_nan_is_a_clear_error(tmp_path):
    import numpy as np

    from rlmusic_pl.data.contrast import _read_feature_file
    from rlmusic_pl.data.prepare import DataFolderError

    mel = np.zeros((50, 64), dtype=np.float32)
    mel[3, 5] = np.nan
    np.save(tmp_path / "bad.npy", mel)
    with pytest.raises(DataFolderError, match="bad.npy.*NaN"):
        _read_feature_file(tmp_path / "bad.npy")
