"""PreferenceRewardModule: the Bradley-Terry loss, accuracy and calibration by hand, learning, export round trip, exact resume."""

import itertools
import json
import math

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.data.audio import write_wav
from rlmusic_pl.data.preferences import PreferencePairs
from rlmusic_pl.modules import PreferenceRewardModule
from rlmusic_pl.modules.preference import bradley_terry_loss, pair_correct
from rlmusic_pl.rewards import CLAPEncoder, MelStatisticsEncoder, PreferenceReward, RewardError
from rlmusic_pl.rewards.preference import CONFIG_FILE, WEIGHTS_FILE, load_reward_model

RATE = 16000
FREQUENCIES = [200.0 * 1.3**i for i in range(10)]


@pytest.fixture(scope="module")
def brightness_pairs(tmp_path_factory):
    """Pairs of tones where the higher one is always preferred (one tie), as a pairs file."""
    root = tmp_path_factory.mktemp("pairs")
    generator = torch.Generator().manual_seed(0)
    time = torch.arange(RATE // 4) / RATE
    for index, frequency in enumerate(FREQUENCIES):
        level = 0.1 + 0.3 * torch.rand((), generator=generator)
        write_wav(root / "clips" / f"c{index}.wav", level * torch.sin(2 * math.pi * frequency * time), RATE)
    records = [{"prompt": ["a bright tone", "a high note"][(i + j) % 2], "chosen": f"clips/c{j}.wav", "rejected": f"clips/c{i}.wav"}
               for i, j in itertools.combinations(range(len(FREQUENCIES)), 2)]
    records[0]["tie"] = True
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "pairs.jsonl"


def data(pairs_file, val_fraction=0.3, batch_size=8):
    return PromptAttributeDataModule(preferences=PreferencePairs(str(pairs_file), duration_s=0.25), val_fraction=val_fraction,
                                     batch_size=batch_size, seed=0)


def module(**overrides):
    return PreferenceRewardModule(**{"encoder": MelStatisticsEncoder(text_dim=16), "hidden_dim": 16, "learning_rate": 1e-2,
                                     "dropout": 0.1, **overrides})


def trainer(tmp_path, epochs, **kwargs):
    return Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


def test_bradley_terry_loss_and_accuracy_equal_a_hand_computation():
    margin = torch.tensor([2.0, -1.0, 0.0, 0.5])
    tie = torch.tensor([False, False, False, True])

    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))

    by_hand = -(log_sigmoid(2.0) + log_sigmoid(-1.0) + log_sigmoid(0.0) + (log_sigmoid(0.5) + log_sigmoid(-0.5)) / 2) / 4
    assert bradley_terry_loss(margin, tie).item() == pytest.approx(by_hand, rel=1e-6)
    assert pair_correct(margin, tie).tolist() == [1.0, 0.0, 0.5]  # the tie is left out of the accuracy
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([False])).item() == pytest.approx(-log_sigmoid(3.0), rel=1e-6)


def test_held_out_metrics_equal_a_hand_computation(brightness_pairs, tmp_path):
    model, datamodule = module(calibration_bins=4), data(brightness_pairs)
    with torch.no_grad():
        model.scorer.output.weight.normal_(generator=torch.Generator().manual_seed(1))
    metrics = trainer(tmp_path, 1).validate(model, datamodule, verbose=False)[0]
    val = datamodule.split("val")
    encoder, pairs = model.scorer.encoder, datamodule.preferences
    with torch.no_grad():
        def score(side):
            audio = torch.stack([pairs.audio(item[side]) for item in val])
            return model.scorer.score_embeddings(encoder.embed_audio(audio, RATE), encoder.embed_text([i["prompt"] for i in val]))

        margin = score("chosen") - score("rejected")
    tie = torch.tensor([item["tie"] for item in val])
    assert metrics["val/loss"] == pytest.approx(bradley_terry_loss(margin, tie).item(), rel=1e-5)
    decided = margin[~tie]
    assert metrics["val/accuracy"] == pytest.approx((decided > 0).float().mean().item(), rel=1e-6)
    # ECE, each pair in both orders: bins of width 1/4 over the probability of the first clip winning.
    probability = torch.sigmoid(torch.cat([decided, -decided]))
    won = torch.cat([torch.ones_like(decided), torch.zeros_like(decided)])
    bins = (probability * 4).long().clamp(max=3)
    ece = sum((bins == b).sum() / len(bins) * (probability[bins == b].mean() - won[bins == b].mean()).abs()
              for b in range(4) if (bins == b).any())
    assert metrics["val/calibration_error"] == pytest.approx(float(ece), abs=1e-5)


def test_fit_learns_and_exports_a_reward_that_scores_identically(brightness_pairs, tmp_path):
    model, datamodule = module(), data(brightness_pairs)
    before = trainer(tmp_path, 1).validate(model, datamodule, verbose=False)[0]["val/accuracy"]
    fit = trainer(tmp_path, 12)
    fit.fit(model, datamodule)
    after = fit.validate(model, datamodule, verbose=False)[0]
    assert after["val/accuracy"] >= 0.9 > before
    exported = tmp_path / "reward_model"
    assert (exported / WEIGHTS_FILE).is_file() and (exported / CONFIG_FILE).is_file()
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["encoder"]["class_path"] == "rlmusic_pl.rewards.encoders.MelStatisticsEncoder"
    assert config["metrics"]["val/accuracy"] == pytest.approx(after["val/accuracy"])

    reward = PreferenceReward(checkpoint=str(exported))
    waves = torch.stack([datamodule.preferences.audio(item["chosen"]) for item in datamodule.split("val")])
    prompts = [item["prompt"] for item in datamodule.split("val")]
    with torch.no_grad():
        expected = model.scorer.eval()(waves, RATE, prompts)
    scores = reward.evaluate(waves, RATE, prompts, [{}] * len(prompts)).total
    assert torch.equal(scores, expected)
    tones = torch.stack([0.2 * torch.sin(2 * math.pi * f * torch.arange(RATE // 4) / RATE) for f in (300.0, 2000.0)])
    low, high = reward.evaluate(tones, RATE, ["a tone"] * 2, [{}, {}]).total
    assert high > low  # the brighter tone is preferred, as in the training pairs


def test_resume_is_exact(brightness_pairs, tmp_path):
    straight = module()
    trainer(tmp_path / "straight", 2).fit(straight, data(brightness_pairs))
    first = trainer(tmp_path / "resumed", 1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    first.fit(module(), data(brightness_pairs))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("scorer.encoder.") for key in checkpoint["state_dict"]) and "standardised" in checkpoint["state_dict"]
    resumed = module(seed=0)
    trainer(tmp_path / "resumed", 2).fit(resumed, data(brightness_pairs), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for (name, a), b in zip(straight.scorer.head_state().items(), resumed.scorer.head_state().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_head_is_refused(brightness_pairs, tmp_path):
    trainer(tmp_path, 1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(module(), data(brightness_pairs))
    with pytest.raises(Exception, match="does not fit this model"):
        trainer(tmp_path, 2).fit(module(hidden_dim=8), data(brightness_pairs), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_bad_reward_checkpoints_are_named(tmp_path):
    with pytest.raises(RewardError, match="reward_model.json not found"):
        PreferenceReward(checkpoint=str(tmp_path))
    (tmp_path / CONFIG_FILE).write_text('{"format": "something else"}')
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(RewardError, match="not a preference reward model"):
        load_reward_model(tmp_path)


def test_the_clap_encoder_embeds_both_sides():
    encoder = CLAPEncoder(model="tiny")
    audio = encoder.embed_audio(torch.randn(2, RATE // 2) * 0.1, RATE)
    text = encoder.embed_text(["a piano", "a drum"])
    assert audio.shape == (2, encoder.audio_dim) and text.shape == (2, encoder.text_dim)
    assert encoder.spec() == {"class_path": "rlmusic_pl.rewards.encoders.CLAPEncoder", "init_args": {"model": "tiny", "checkpoint": None, "seed": 0}}
