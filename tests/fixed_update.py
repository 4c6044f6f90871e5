"""One RL optimizer step (DDPO or MusicRL) on fixed samples and advantages, in one process or split over DDP ranks.

Every process samples the same batch (one fixed seed, not the rank's) and gives it fixed advantages;
under DDP each rank trains on its share of it. Then one process with all of it and two ranks with
half each make the same LoRA update exactly when the ranks' gradients are averaged. The update is
plain SGD without clipping: Adam's step and a clipped gradient's norm do not depend on the
gradient's scale, so they would hide ranks that sum their gradients instead of averaging them.
MusicRL's KL term is on (alpha 0.5) with a LoRA that already acts, so its gradient is averaged too.

    python tests/fixed_update.py {ddpo,musicrl} DEVICES OUT_DIR   # writes OUT_DIR/rank<r>.pt: the LoRA before and after the step
"""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from lightning import Trainer

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.lora import lora_parameters
from rlmusic_pl.modules import DDPOModule, MusicRLModule
from rlmusic_pl.rewards import RewardResult, SpectralCentroidReward

ADVANTAGES = torch.tensor([1.5, -0.5, -2.0, 1.0])  # of the 2 prompts x 2 samples
COMMON = dict(backbone="tiny", samples_per_prompt=2, sample_batch_size=4, gradient_accumulation=1, max_grad_norm=0.0, learning_rate=1.0)


class FixedUpdate:
    """Mixin: train each rank on its share of one fixed batch (``batch``), with fixed advantages, by SGD.

    ``per_sample`` names the rollout fields with one row per sample.
    """

    batch: dict
    per_sample: tuple[str, ...]

    def sample_rollouts(self, batch, generator):
        everything = super().sample_rollouts(self.batch, torch.Generator().manual_seed(0))
        share = len(everything.prompts) // self.trainer.world_size
        rows = slice(self.global_rank * share, (self.global_rank + 1) * share)
        rewards = RewardResult(everything.rewards.total[rows], {k: v[rows] for k, v in everything.rewards.components.items()})
        return replace(everything, rewards=rewards, advantages=ADVANTAGES[rows].to(self.device),
                       **{name: getattr(everything, name)[rows] for name in self.per_sample})

    def compute_advantages(self, rollouts):
        return rollouts.advantages

    def configure_optimizers(self):
        return torch.optim.SGD(lora_parameters(self.adapted_network), lr=self.hparams.learning_rate)


class FixedUpdateDDPO(FixedUpdate, DDPOModule):
    batch = {"prompt": ["a happy piano", "a sad violin"], "negative_prompt": ["noise", "low quality"], "attributes": [{}, {}]}
    per_sample = ("latents", "log_probs", "cond", "prompts", "attributes", "waveforms")


class FixedUpdateMusicRL(FixedUpdate, MusicRLModule):
    batch = {"prompt": ["a bright C note", "a dull G note"], "attributes": [{}, {}]}
    per_sample = ("codes", "log_probs", "cond", "prompts", "attributes", "waveforms")

    def configure_model(self) -> None:
        super().configure_model()
        generator = torch.Generator().manual_seed(0)
        for param in lora_parameters(self.backbone.decoder):  # a LoRA that acts: the KL and its gradient are not 0
            param.data = 0.3 * torch.randn(param.shape, generator=generator)


MODULES = {
    "ddpo": lambda devices: FixedUpdateDDPO(SpectralCentroidReward(), train_batch_size=len(ADVANTAGES) // devices, duration_s=0.5,
                                            num_steps=3, **COMMON),
    "musicrl": lambda devices: FixedUpdateMusicRL(SpectralCentroidReward(), train_batch_size=len(ADVANTAGES) // devices, duration_s=0.1,
                                                  text_length=16, kl_coef=0.5, baseline="rloo", lora_rank=2, **COMMON),
}


def run(kind: str, devices: int, out_dir: Path) -> Path:
    """Train one step on ``devices`` CPU processes (each trains on one minibatch: its whole share); return OUT_DIR."""
    module = MODULES[kind](devices)
    module.configure_model()
    before = lora_state(module)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=out_dir)
    trainer.fit(module, PromptAttributeDataModule(prompts=module.batch["prompt"], batch_size=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"before": before, "after": lora_state(module)}, out_dir / f"rank{trainer.global_rank}.pt")
    return out_dir


def lora_state(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if ".lora_" in name}


def check_two_ranks_make_the_update_of_one_process(kind: str, tmp_path: Path, env: dict) -> None:
    """Assert that two DDP ranks with half the samples each make the LoRA update of one process with all of them."""
    single = torch.load(run(kind, 1, tmp_path / "single") / "rank0.pt")
    command = [sys.executable, __file__, kind, "2", str(tmp_path / "ddp")]
    result = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]

    def update(state) -> torch.Tensor:
        return torch.cat([(state["after"][k] - state["before"][k]).flatten() for k in sorted(state["before"])])

    expected = update(single)
    assert expected.abs().max() > 0
    for rank in ranks:
        torch.testing.assert_close(rank["before"], single["before"], rtol=0, atol=0)
        torch.testing.assert_close(update(rank), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
