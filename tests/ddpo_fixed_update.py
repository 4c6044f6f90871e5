"""One DDPO optimizer step on fixed trajectories and advantages, in one process or split over DDP ranks.

Every process samples the same trajectories (one fixed seed, not the rank's) and gives them fixed
advantages; under DDP each rank trains on its share of them. Then one process with all of them and
two ranks with half each make the same LoRA update exactly when the ranks' gradients are averaged.
The update is plain SGD without clipping: Adam's step and a clipped gradient's norm do not depend on
the gradient's scale, so they would hide ranks that sum their gradients instead of averaging them.

    python tests/ddpo_fixed_update.py DEVICES OUT_DIR   # writes OUT_DIR/rank<r>.pt: the LoRA before and after the step
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch
from lightning import Trainer

from rlmusic_pl.data import PromptAttributeDataModule
from rlmusic_pl.lora import lora_parameters
from rlmusic_pl.modules import DDPOModule
from rlmusic_pl.rewards import RewardResult, SpectralCentroidReward

BATCH = {"prompt": ["a happy piano", "a sad violin"], "negative_prompt": ["noise", "low quality"], "attributes": [{}, {}]}
SAMPLES_PER_PROMPT = 2
ADVANTAGES = torch.tensor([1.5, -0.5, -2.0, 1.0])  # of the 2 x 2 samples
SETTINGS = dict(backbone="tiny", duration_s=0.5, num_steps=3, samples_per_prompt=SAMPLES_PER_PROMPT, sample_batch_size=4,
                gradient_accumulation=1, max_grad_norm=0.0, learning_rate=1.0)


class FixedUpdateDDPO(DDPOModule):
    """DDPOModule training each rank on its share of one fixed batch of trajectories, with fixed advantages, by SGD."""

    def sample_rollouts(self, batch, generator):
        everything = super().sample_rollouts(BATCH, torch.Generator().manual_seed(0))
        share = len(everything.prompts) // self.trainer.world_size
        rows = slice(self.global_rank * share, (self.global_rank + 1) * share)
        rewards = RewardResult(everything.rewards.total[rows], {k: v[rows] for k, v in everything.rewards.components.items()})
        return replace(everything, latents=everything.latents[rows], log_probs=everything.log_probs[rows], cond=everything.cond[rows],
                       prompts=everything.prompts[rows], attributes=everything.attributes[rows], waveforms=everything.waveforms[rows],
                       rewards=rewards, advantages=ADVANTAGES[rows].to(self.device))

    def compute_advantages(self, rollouts):
        return rollouts.advantages

    def configure_optimizers(self):
        return torch.optim.SGD(lora_parameters(self.backbone.unet), lr=self.hparams.learning_rate)


def run(devices: int, out_dir: Path) -> Path:
    """Train one step on ``devices`` CPU processes (each trains on one minibatch: its whole share); return OUT_DIR."""
    module = FixedUpdateDDPO(SpectralCentroidReward(), train_batch_size=len(ADVANTAGES) // devices, **SETTINGS)
    module.configure_model()
    before = lora_state(module)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=out_dir)
    trainer.fit(module, PromptAttributeDataModule(prompts=BATCH["prompt"], batch_size=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"before": before, "after": lora_state(module)}, out_dir / f"rank{trainer.global_rank}.pt")
    return out_dir


def lora_state(module: DDPOModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if ".lora_" in name}


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(int(sys.argv[1]), Path(sys.argv[2]))
