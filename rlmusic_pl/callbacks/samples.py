"""The record of generated samples that modules return from their steps for callbacks to log."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SampleBatch:
    """Generated audio of one step with its prompts and rewards, returned as ``outputs["samples"]``.

    Args:
        waveforms: mono audio [B, T] (cpu, float).
        sample_rate: sample rate of ``waveforms`` in Hz.
        prompts: the B prompts.
        attributes: the B prompts' attributes.
        rewards: reward components [B] by name, the combined reward under "total".
        strengths: slider strength per sample [B], where the module has one.
    """

    waveforms: Tensor
    sample_rate: int
    prompts: list[str]
    attributes: list[dict[str, str]]
    rewards: dict[str, Tensor]
    strengths: Tensor | None = None

    def __post_init__(self) -> None:
        if self.waveforms.dim() != 2:
            raise ValueError(f"SampleBatch.waveforms: expected shape [batch, samples], got {tuple(self.waveforms.shape)}")
        batch = self.waveforms.shape[0]
        sized = {"prompts": len(self.prompts), "attributes": len(self.attributes)}
        sized.update({f"rewards[{name!r}]": values.numel() for name, values in self.rewards.items()})
        if self.strengths is not None:
            sized["strengths"] = self.strengths.numel()
        wrong = {field: size for field, size in sized.items() if size != batch}
        if wrong:
            raise ValueError(f"SampleBatch: {batch} waveforms but {wrong}; every field needs one entry per waveform")
