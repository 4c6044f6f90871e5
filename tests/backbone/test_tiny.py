"""The tiny random-weight AudioLDM2: deterministic by seed, offline, and a working AudioLDM2."""

import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

from rlmusic_pl.backbone.audioldm2 import AudioLDM2Backbone, BackboneLoadError
from rlmusic_pl.backbone.tiny import build_tiny_pipeline

COMPONENTS = ("unet", "vae", "vocoder", "text_encoder", "text_encoder_2", "projection_model", "language_model")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of waiting on the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tiny backbone tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def state_dicts(pipeline):
    return {name: getattr(pipeline, name).state_dict() for name in COMPONENTS}


def test_same_seed_gives_identical_weights(no_network):
    first, second = state_dicts(build_tiny_pipeline(seed=3)), state_dicts(build_tiny_pipeline(seed=3))
    for component in COMPONENTS:
        assert first[component].keys() == second[component].keys()
        for key, value in first[component].items():
            assert torch.equal(value, second[component][key]), f"{component}.{key} differs for the same seed"


def test_different_seeds_give_different_weights():
    first, second = state_dicts(build_tiny_pipeline(seed=0)), state_dicts(build_tiny_pipeline(seed=1))
    for component in ("unet", "vae", "vocoder", "text_encoder_2"):
        differing = [k for k, v in first[component].items() if v.is_floating_point() and v.numel() > 1 and not torch.equal(v, second[component][k])]
        assert differing, f"{component} has the same weights for seeds 0 and 1"


def test_building_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_pipeline(seed=5)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("duration_s", [1.0, 0.29, 1.005])
def test_tiny_backbone_generates_finite_audio_of_the_requested_length(no_network, duration_s):
    backbone = AudioLDM2Backbone.load("tiny", seed=0)
    assert backbone.sample_rate == 16000
    cond = backbone.encode_prompts(["a happy piano solo", "an angry drum loop"], ["low quality", ""])
    latents = backbone.initial_latents(2, duration_s, torch.Generator().manual_seed(0))
    result = backbone.sample(cond, latents, num_steps=2, guidance_scale=3.0, eta=1.0, generator=torch.Generator().manual_seed(1))
    waveforms = backbone.decode(result.final, duration_s)

    assert waveforms.shape == (2, round(duration_s * 16000))
    assert waveforms.dtype == torch.float32
    assert torch.isfinite(waveforms).all()
    assert waveforms.abs().sum() > 0
    assert result.latents.shape == (2, 3, *latents.shape[1:])
    assert torch.isfinite(result.log_probs).all() and result.log_probs.shape == (2, 2)


def test_missing_local_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(BackboneLoadError, match="no_such_model"):
        AudioLDM2Backbone.load(str(missing))


def test_directory_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(BackboneLoadError, match="model_index.json") as info:
        AudioLDM2Backbone.load(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pipeline") / "tiny"
    build_tiny_pipeline(seed=0).save_pretrained(directory)
    return directory


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def test_a_saved_pipeline_without_a_component_folder_names_it(saved_pipeline, tmp_path):
    directory = copy_of(saved_pipeline, tmp_path)
    shutil.rmtree(directory / "unet")
    expected = r"tiny: not a complete AudioLDM2 pipeline, missing the component folder\(s\) unet/$"
    with pytest.raises(BackboneLoadError, match=expected):
        AudioLDM2Backbone.load(str(directory))


@pytest.mark.parametrize("index, expected", [
    ("{}", 'model_index.json: no "_class_name" field'),
    ("[]", 'model_index.json: no "_class_name" field'),
    ("{not json", "model_index.json: not valid JSON"),
    ('{"_class_name": "StableDiffusionPipeline"}', "model_index.json: a StableDiffusionPipeline pipeline, not an AudioLDM2"),
    ('{"_class_name": "AudioLDM2Pipeline", "unet": ["audioldm2", "AudioLDM2UNet2DConditionModel"]}',
     "model_index.json: lists no vae, text_encoder, "),
])
def test_a_model_index_that_does_not_describe_an_audioldm2_pipeline_names_the_field(saved_pipeline, tmp_path, index, expected):
    directory = copy_of(saved_pipeline, tmp_path)
    (directory / "model_index.json").write_text(index)
    with pytest.raises(BackboneLoadError, match=re.escape(expected)):
        AudioLDM2Backbone.load(str(directory))


def test_a_saved_pipeline_loads_from_its_directory(saved_pipeline):
    loaded, built = AudioLDM2Backbone.load(str(saved_pipeline)), AudioLDM2Backbone.load("tiny")
    for name, value in built.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], value), name


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError) as info:
        AudioLDM2Backbone.load("rlmusic-pl-tests/no-such-model")
    message = str(info.value)
    assert "rlmusic-pl-tests/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message


def test_diffusers_pipeline_runs_on_the_tiny_components():
    backbone = AudioLDM2Backbone.load("tiny")
    output = backbone.pipeline(
        "a calm piano solo", negative_prompt="low quality", num_inference_steps=2, audio_length_in_s=1.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    assert output.audios.shape == (1, 16000)
    assert torch.isfinite(torch.as_tensor(output.audios)).all()
