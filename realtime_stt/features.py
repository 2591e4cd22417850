"""Whisper's log-mel features, each frame computed once as the audio arrives and kept per utterance.

A partial decodes its window's speech several times a second; computing the features of the whole
window each time cost 24 s of features per second of speech (a 6 s window four times a second).
A frame is 400 samples (25 ms) every 160 (10 ms), and depends on those samples alone, but for two
things that faster-whisper's extractor (``FeatureExtractor.__call__``) does to the whole input:
the frames at its edges see reflected and zero padding, and the log energies are clamped to 8
below the input's loudest before scaling. So a window's features are its kept frames, the few
frames at its edges (and at each join of its speech chunks) computed again from the window's own
audio, and the clamp and scaling applied to them all: the same values as the extractor gives for
the same audio, to float rounding (``realtime_stt/test_features.py``).

The kept frames are indexed by their centre: frame ``k`` of an utterance covers samples
``160k - 200`` to ``160k + 200``. A window that starts on that grid (a multiple of 160 samples) then
finds its frame ``t`` at ``k = start / 160 + t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HOP = 160  # samples between frames
N_FFT = 400  # samples a frame reads
HALF = N_FFT // 2
_WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # as faster-whisper's extractor makes it


def log_mel(frames: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """log10 mel energies (mels x n) of ``frames`` (n x 400 samples), as faster-whisper computes
    each frame: Hann window, real FFT, power, mel filters, log10 above 1e-10."""
    spectrum = np.fft.rfft(frames * _WINDOW, axis=-1).astype(np.complex64)
    power = np.abs(spectrum.T) ** 2
    return np.log10(np.clip(filters @ power, 1e-10, None))


def normalized(log_spec: np.ndarray) -> np.ndarray:
    """faster-whisper's last step over a whole input: clamp to 8 below its loudest, then scale."""
    return (np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0


class MelFrames:
    """The log10 mel energies of one utterance's frames, computed as its audio arrives.

    Frames ``first`` to ``count - 1`` are kept (frames 0 and 1 read before the audio's start and are
    never kept; ``trim`` drops frames no window will read again). Appending writes past ``count``
    only, and a full array is replaced, not resized: a reader that took ``snapshot()`` reads frames
    that never change, from another thread.
    """

    def __init__(self, filters: np.ndarray) -> None:
        self.filters = filters
        self._log = np.empty((filters.shape[0], 256), dtype=np.float32)
        self.first = 2  # frame index of column 0
        self.count = 2  # frames below it are known

    def needs_from(self) -> int:
        """The first sample the next frames read."""
        return self.count * HOP - HALF

    def ready(self, end: int) -> int:
        """How many frames (from 0) the audio up to sample ``end`` completes."""
        return max(self.count, (end - HALF) // HOP + 1)

    def frames_to_add(self, audio: np.ndarray, start: int) -> np.ndarray:
        """The (n x 400) sample frames that ``audio`` (float32, from sample ``start``) completes
        beyond those kept; ``start`` must be at most ``needs_from()``."""
        offset = self.needs_from() - start
        usable = audio.size - offset
        n = max(0, (usable - N_FFT) // HOP + 1)
        if n == 0:
            return np.zeros((0, N_FFT), dtype=np.float32)
        return np.lib.stride_tricks.sliding_window_view(audio[offset : offset + (n - 1) * HOP + N_FFT], N_FFT)[::HOP]

    def skip_to(self, sample: int) -> None:
        """The audio before ``sample`` is gone unscored (trimmed): keep frames from there on."""
        frame = -(-(sample + HALF) // HOP)
        if frame > self.count:
            self._log = np.empty_like(self._log)  # a new array: snapshots keep the frames they hold
            self.first = self.count = frame

    def add(self, log_spec: np.ndarray) -> None:
        """Append frames ``count`` on (mels x n, from ``log_mel``)."""
        n = log_spec.shape[1]
        used = self.count - self.first
        if used + n > self._log.shape[1]:
            grown = np.empty((self._log.shape[0], max(2 * self._log.shape[1], used + n)), dtype=np.float32)
            grown[:, :used] = self._log[:, :used]
            self._log = grown
        self._log[:, used : used + n] = log_spec
        self.count += n

    def trim(self, sample: int) -> None:
        """Forget frames that read only audio before ``sample`` (no later window starts there)."""
        drop = min(self.count, (sample - HALF) // HOP + 1) - self.first
        if drop > 0:
            self._log = self._log[:, drop:].copy()
            self.first += drop

    def snapshot(self) -> KeptFrames:
        return KeptFrames(self._log, self.first, self.count)


@dataclass(frozen=True)
class KeptFrames:
    """Frames ``first`` to ``count - 1`` of an utterance, as they stood when taken."""

    log: np.ndarray  # column 0 is frame ``first``
    first: int
    count: int


def window_features(
    kept: KeptFrames | None, audio: np.ndarray, start: int, spans: Sequence[tuple[int, int]], filters: np.ndarray
) -> np.ndarray:
    """Whisper's features (mels x frames, the last frame dropped as decoder.py drops it) of the
    speech ``spans`` of ``audio`` joined: what ``feature_extractor(joined)[:, :-1]`` gives.

    ``audio`` starts at sample ``start`` of the utterance, a multiple of HOP; ``spans`` are (start,
    end) samples of ``audio`` whose starts (and ends, but the last) are multiples of HOP. Frames
    whose 400 samples lie within one span are taken from ``kept``; the others are computed from the
    joined audio, padded as faster-whisper pads it.
    """
    joined = np.concatenate([audio[a:b] for a, b in spans]) if spans else audio[:0]
    length = joined.size
    total = (length + HOP) // HOP  # frames faster-whisper computes (before decoder.py drops one)
    out = np.empty((filters.shape[0], total), dtype=np.float32)
    known = np.zeros(total, dtype=bool)
    if kept is not None:
        offset = 0  # where each span starts in the joined audio
        for a, b in spans:
            lo = -(-(offset + HALF) // HOP)  # first frame wholly inside this span
            hi = (offset + (b - a) - HALF) // HOP  # last one
            shift = (start + a - offset) // HOP  # joined frame t is the utterance's frame t + shift
            lo = max(lo, kept.first - shift)
            hi = min(hi, kept.count - 1 - shift, total - 1)
            if hi >= lo:
                out[:, lo : hi + 1] = kept.log[:, lo + shift - kept.first : hi + shift - kept.first + 1]
                known[lo : hi + 1] = True
            offset += b - a
    missing = np.flatnonzero(~known)
    if missing.size:
        padded = np.pad(np.pad(joined, (0, HOP)), HALF, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][missing]
        out[:, missing] = log_mel(frames, filters)
    return normalized(out)[:, :-1]


def window_grid(sample: int) -> int:
    """The first sample at or after ``sample`` on the frame grid: where a window may start."""
    return -(-sample // HOP) * HOP
