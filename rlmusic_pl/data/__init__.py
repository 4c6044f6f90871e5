from rlmusic_pl.data.concepts import ConceptDataModule
from rlmusic_pl.data.contrast import ContrastDataset, ContrastPairs, ContrastSets, SyntheticContrastSets
from rlmusic_pl.data.datamodule import PromptAttributeDataModule, collate_items
from rlmusic_pl.data.preferences import PreferenceDataError, PreferenceDataset, PreferencePairs
from rlmusic_pl.data.prompts import PromptError, expand_template, load_prompt_file

__all__ = [
    "ConceptDataModule", "ContrastDataset", "ContrastPairs", "ContrastSets", "SyntheticContrastSets",
    "PreferenceDataError", "PreferenceDataset", "PreferencePairs", "PromptAttributeDataModule", "PromptError", "collate_items", "expand_template", "load_prompt_file",
]
