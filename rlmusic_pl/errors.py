"""The base class of the errors rlmusic_pl raises for input it cannot use."""

from __future__ import annotations


class RLMusicError(Exception):
    """Bad input refused by the library: its message names the file, field or prompt and what was expected.

    Every error class of the library (``LoRAError``, ``BackboneLoadError``, ``RewardError``,
    ``PromptError``, ``AudioError``, ``SweepError``, ``CheckpointError``, ...) derives from it, so
    ``except RLMusicError`` catches them all, and the CLI prints their message as one line.
    """


class MissingExtraError(RLMusicError, ImportError):
    """An optional feature needs a package that is not installed; the message names the extra to install."""
