"""Audio I/O and the log-mel front end shared by the backbone, the data sets and the rewards.

The mel front end reproduces AudioLDM's STFT (16 kHz mono, n_fft 1024, hop 160, 64 slaney mel
bins over 0-8000 Hz, magnitude spectrogram, natural-log compression clamped at 1e-5), built on
``torch.stft`` and ``transformers.audio_utils.mel_filter_bank``. Other front ends (e.g. torchaudio's
``MelSpectrogram`` + ``AmplitudeToDB``: power spectrogram, HTK mel scale without norm, decibels) are
other ``MelConfig`` values.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import julius
import numpy as np
import soundfile
import torch
from transformers.audio_utils import mel_filter_bank

from rlmusic_pl.errors import RLMusicError


class AudioError(RLMusicError, ValueError):
    """Raised for audio that cannot be read or used; the message names the file or the field."""


@dataclass(frozen=True)
class MelConfig:
    """Parameters of a log-mel spectrogram (defaults: AudioLDM / AudioLDM2).

    ``power`` 1 takes the STFT magnitude, 2 its power; ``mel_scale`` and ``mel_norm`` are passed to
    ``transformers.audio_utils.mel_filter_bank``; ``decibels`` compresses with 10*log10(max(x, 1e-10))
    (torchaudio's ``AmplitudeToDB``) instead of ln(max(x, 1e-5)).
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    power: float = 1.0
    mel_scale: str = "slaney"
    mel_norm: str | None = "slaney"
    decibels: bool = False


AUDIOLDM_MEL = MelConfig()


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import: os.umask cannot be read without being set


@lru_cache(maxsize=8)
def _mel_basis(config: MelConfig) -> torch.Tensor:
    basis = mel_filter_bank(
        num_frequency_bins=config.n_fft // 2 + 1,
        num_mel_filters=config.n_mels,
        min_frequency=config.f_min,
        max_frequency=config.f_max,
        sampling_rate=config.sample_rate,
        norm=config.mel_norm,
        mel_scale=config.mel_scale,
    )
    return torch.from_numpy(basis.T.astype(np.float32))  # [n_mels, n_freq]


def check_waveforms(waveforms: torch.Tensor, name: str = "waveforms") -> None:
    """Raise AudioError unless ``waveforms`` is a finite float tensor of shape [B, T]."""
    if not isinstance(waveforms, torch.Tensor):
        raise AudioError(f"{name}: expected a torch.Tensor of shape [batch, samples], got {type(waveforms).__name__}")
    if waveforms.dim() != 2:
        raise AudioError(f"{name}: expected shape [batch, samples], got {tuple(waveforms.shape)}")
    if waveforms.shape[-1] == 0:
        raise AudioError(f"{name}: the waveforms hold no samples")
    if not torch.isfinite(waveforms).all():
        raise AudioError(f"{name}: the waveforms contain NaN or inf")


def log_mel(waveforms: torch.Tensor, config: MelConfig = AUDIOLDM_MEL) -> torch.Tensor:
    """Log-mel spectrogram of mono waveforms [B, T] (or [T]) at ``config.sample_rate``: [B, frames, n_mels]."""
    squeeze = waveforms.dim() == 1
    wave = waveforms.unsqueeze(0) if squeeze else waveforms
    check_waveforms(wave)
    pad = (config.n_fft - config.hop_length) // 2
    if wave.shape[-1] <= pad:
        raise AudioError(f"waveforms of {wave.shape[-1]} samples are too short for a log-mel frame (need more than {pad})")
    wave = torch.nn.functional.pad(wave.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        wave,
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window=torch.hann_window(config.win_length, device=wave.device),
        center=False,
        return_complex=True,
    ).abs()
    if config.power != 1.0:
        spec = spec.pow(config.power)
    mel = _mel_basis(config).to(wave.device) @ spec  # [B, n_mels, frames]
    if config.decibels:
        mel = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    else:
        mel = torch.log(torch.clamp(mel, min=1e-5))
    mel = mel.transpose(1, 2)
    return mel[0] if squeeze else mel


def resample(waveforms: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample along the last dimension with julius (band-limited sinc)."""
    if orig_sr == new_sr:
        return waveforms
    return julius.resample_frac(waveforms.float(), int(orig_sr), int(new_sr))


def load_audio(path: str | os.PathLike, sample_rate: int = AUDIOLDM_MEL.sample_rate) -> torch.Tensor:
    """Read an audio file (any format soundfile reads), mix to mono, resample: a float tensor [T]."""
    path = Path(path)
    try:
        data, file_sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not a readable audio file ({err})") from err
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    mono = torch.from_numpy(data.mean(axis=1))
    if not torch.isfinite(mono).all():
        raise AudioError(f"{path}: the audio contains NaN or inf samples")
    return resample(mono, file_sr, sample_rate)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_directory_write(directory: str | os.PathLike, write) -> None:
    """Call ``write(staging_dir)`` on an empty directory beside ``directory``, then swap it in.

    Readers see the old content or the new, never a mix, and no file of the old content survives
    into the new.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.new-"))
    try:
        write(staging)
        _give_usual_permissions(staging)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            directory.replace(retired / directory.name)
            staging.replace(directory)
            shutil.rmtree(retired)
        else:
            staging.replace(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class OutputPathError(RLMusicError, ValueError):
    """An output location cannot be written; the message names the setting and the path."""


def check_writable(
    path: str | os.PathLike, field: str, error: type[Exception] = OutputPathError, replaced_whole: bool = False
) -> None:
    """``error`` naming ``field`` and ``path`` unless files can be written at ``path``; creates nothing.

    ``path`` is a directory that need not exist yet (its missing parents are created when written).
    ``replaced_whole``: it is written by ``atomic_directory_write``, which works beside it, in its parent.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise error(f"{field} {path}: cannot write there (it is a file, not a folder); choose another {field}")
    place = path.parent if replaced_whole else path
    while not place.exists():
        place = place.parent
    try:
        if not place.is_dir():
            raise NotADirectoryError(f"{place} is a file, not a folder")
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as err:
        raise error(f"{field} {path}: cannot write there ({err.strerror or err}); choose another {field}") from err


def _give_usual_permissions(root: Path) -> None:
    # mkdtemp and some writers (safetensors) create owner-only entries.
    root.chmod(0o777 & ~UMASK)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~UMASK)


def read_jsonl(path: str | os.PathLike, error: type[Exception], encoding: str = "utf-8") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; invalid JSON raises ``error`` naming file and line."""
    with open(path, encoding=encoding) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None


def write_wav(path: str | os.PathLike, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write a mono waveform [T] as 16-bit PCM WAV, atomically."""
    data = waveform.detach().float().cpu().clamp(-1.0, 1.0).numpy()
    atomic_write(path, lambda tmp: soundfile.write(tmp, data, sample_rate, subtype="PCM_16", format="WAV"))
