"""Speech activity as frames are scored."""

from __future__ import annotations

import numpy as np
import pytest

from realtime_stt.vad import VAD_FRAME, SpeechActivity


def test_speech_activity_tracks_the_last_speech_frame():
    speech = SpeechActivity(threshold=0.5)
    assert not speech.heard() and speech.trailing_silence() == 0.0
    speech.add(np.array([0.1, 0.2], dtype=np.float32))
    assert not speech.heard() and speech.silent_since(0)
    speech.add(np.array([0.9, 0.6, 0.3, 0.1, 0.2], dtype=np.float32))  # speech in frames 2 and 3
    assert speech.heard() and speech.scored_until == 7 * VAD_FRAME
    assert speech.trailing_silence() == pytest.approx(3 * VAD_FRAME / 16000)
    assert speech.silent_since(4 * VAD_FRAME) and not speech.silent_since(4 * VAD_FRAME - 1)
    speech.add(np.array([0.5], dtype=np.float32))  # the threshold itself counts as speech
    assert speech.trailing_silence() == 0.0 and not speech.silent_since(7 * VAD_FRAME)
