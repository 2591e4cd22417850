"""Kept log-mel frames give a partial window the features faster-whisper computes for the same audio
(pure: no model, no server; real speech where ../shared/eval is there, else a synthetic signal)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from faster_whisper.feature_extractor import FeatureExtractor

from realtime_stt.features import HOP, MelFrames, log_mel, window_features, window_grid

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "eval" / "en_cmu_goforward.wav"


def speech() -> np.ndarray:
    """Real speech (float32, 16 kHz), twice over; a voiced-like synthetic signal without the eval set."""
    if SPEECH.exists():
        with wave.open(str(SPEECH)) as wav:
            audio = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
        return np.tile(audio, 2)
    rng = np.random.default_rng(0)
    t = np.arange(6 * 16000) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0) + 0.01 * rng.normal(size=t.size)).astype(np.float32)


def kept_frames(audio: np.ndarray, filters: np.ndarray, chunk: int = 1600) -> MelFrames:
    """The frames of ``audio`` as a session keeps them: computed as 100 ms chunks arrive."""
    mel = MelFrames(filters)
    for end in range(chunk, audio.size + chunk, chunk):
        start = mel.needs_from()
        frames = mel.frames_to_add(audio[start : min(end, audio.size)], start)
        if len(frames):
            mel.add(log_mel(frames, filters))
    return mel


@pytest.mark.parametrize("mels", [80, 128])
def test_a_windows_kept_features_equal_faster_whispers_for_the_same_audio(mels):
    extractor = FeatureExtractor(feature_size=mels)
    audio = speech()
    mel = kept_frames(audio, extractor.mel_filters)
    assert mel.count == (audio.size - 200) // HOP + 1  # every frame whose 400 samples have come
    kept = mel.snapshot()
    for start in (0, 3200, window_grid(12345)):
        window = audio[start:]
        for spans in (
            [(0, window.size)],  # one stretch of speech, to the newest sample
            [(0, 16000), (48000, window.size)],  # two, joined where a long pause was cut
            [(1600, 20000), (40000, 40000 + 9999)],  # ends off the frame grid at the end only
            [(0, 4800)],  # short
        ):
            joined = np.concatenate([window[a:b] for a, b in spans])
            expected = extractor(joined)[:, :-1]  # as decoder.py takes faster-whisper's features
            got = window_features(kept, window, start, spans, extractor.mel_filters)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_frames_not_kept_are_computed_and_trimmed_frames_are_gone():
    extractor = FeatureExtractor()
    audio = speech()[: 5 * 16000]
    mel = kept_frames(audio, extractor.mel_filters)
    mel.trim(16000)  # a window now starts at 1 s: frames before it are dropped
    assert mel.first == (16000 - 200) // HOP + 1
    kept = mel.snapshot()
    window = audio[8000:]  # starts before the frames kept: those are computed from the audio
    expected = extractor(window)[:, :-1]
    np.testing.assert_allclose(window_features(kept, window, 8000, [(0, window.size)], extractor.mel_filters),
                               expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(window_features(None, window, 8000, [(0, window.size)], extractor.mel_filters),
                               expected, rtol=0, atol=1e-5)


def test_a_snapshot_does_not_change_as_frames_are_added():
    extractor = FeatureExtractor()
    audio = speech()
    mel = kept_frames(audio[:16000], extractor.mel_filters)
    kept = mel.snapshot()
    before = kept.log[:, : kept.count - kept.first].copy()
    start = mel.needs_from()
    mel.add(log_mel(mel.frames_to_add(audio[start:], start), extractor.mel_filters))  # grows past its array
    assert mel.count > kept.count
    np.testing.assert_array_equal(kept.log[:, : kept.count - kept.first], before)


def test_a_window_starts_on_the_frame_grid_at_most_one_hop_late():
    assert window_grid(0) == 0 and window_grid(160) == 160
    assert window_grid(161) == 320 and window_grid(319) == 320
