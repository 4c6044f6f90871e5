"""A callback for the DDP tests (DDPO, MusicRL, Diffusion-DPO): each rank writes its per-prompt statistics (if any) and a LoRA checksum to a file."""

import json
import os
from pathlib import Path

from lightning import Callback

from rlmusic_pl.lora import lora_parameters


def lora_sum(module) -> float:
    return float(sum(p.double().abs().sum() for p in lora_parameters(module.adapted_network)))


class RankState(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.start = lora_sum(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        tracker = getattr(pl_module, "stat_tracker", None)
        state = {"stat_tracker": tracker.state_dict() if tracker is not None else None, "lora_sum": lora_sum(pl_module), "lora_sum_at_start": self.start}
        Path(os.environ["RANK_STATE_DIR"], f"rank{trainer.global_rank}.json").write_text(json.dumps(state))
