"""MusicRFM: concept directions in MusicGen's decoder activations (probes, direction files) and steered generation."""
