"""Uploaded files: read with PyAV as faster-whisper's ``decode_audio`` reads them (its internal
steps, pinned in requirements.txt), but counted as they are decoded."""

from __future__ import annotations

import gc
from typing import BinaryIO

import av
import numpy as np
from faster_whisper.audio import _group_frames, _ignore_invalid_frames, _resample_frames

from realtime_stt.settings import SAMPLE_RATE


class NotAudio(ValueError):
    """A file that holds no audio PyAV can decode; the message says what was wrong."""


class AudioTooLong(ValueError):
    """A file whose audio runs longer than the limit it was read with."""



def read_audio(source: BinaryIO, most_seconds: float) -> np.ndarray:
    """A file's first audio stream as float32 16 kHz mono: decoded and resampled by PyAV with
    faster-whisper's own steps (its ``decode_audio``), but counted as it goes, so that a small
    compressed file holding hours of audio is refused (AudioTooLong) before it fills the memory.
    NotAudio for a file with no audio PyAV can decode."""
    limit = int(most_seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    samples = 0
    resampler = av.audio.resampler.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise NotAudio(f"the file holds no audio stream (it reads as {container.format.name})")
            frames = _resample_frames(_group_frames(_ignore_invalid_frames(container.decode(audio=0)), 500_000), resampler)
            for frame in frames:
                piece = frame.to_ndarray().reshape(-1)
                samples += piece.size
                if samples > limit:
                    raise AudioTooLong(f"the audio runs longer than {most_seconds:g} s")
                pieces.append(piece)
    except av.error.FFmpegError as exc:
        raise NotAudio(f"the file could not be decoded as audio ({exc.strerror or type(exc).__name__})") from exc
    finally:
        # As decode_audio does: some of the resampler's objects are freed only by a collection.
        del resampler
        gc.collect()
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    return audio.astype(np.float32) / 32768.0
