"""What loading a backbone (AudioLDM2 or MusicGen) from the hub can go wrong with, said clearly."""

from __future__ import annotations

import os

from rlmusic_pl.errors import RLMusicError


class BackboneLoadError(RLMusicError, RuntimeError):
    """A backbone's weights could not be loaded; the message says from where and why."""


def hub_load_error(model: str, source: str, alternatives: str, cause: Exception) -> BackboneLoadError:
    """The error for a ``source`` that is neither a local directory nor loadable from the hub.

    Args:
        model: the model family, e.g. ``"AudioLDM2"``.
        source: what the user asked for.
        alternatives: what would have worked, e.g. ``"a hub id such as 'x', a diffusers directory, or 'tiny'"``.
        cause: the loader's own error.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = " (HF_HUB_OFFLINE is set: the model must already be in the hub cache)" if offline else ""
    return BackboneLoadError(
        f"could not load {model} from {source!r}: not a local directory and not loadable from the hub{hint}. "
        f"Use {alternatives}. Cause: {cause}"
    )
