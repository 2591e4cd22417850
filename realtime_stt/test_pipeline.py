"""The utterance's audio buffer."""

from __future__ import annotations

import numpy as np
import pytest

from realtime_stt.pipeline import AudioBuffer


def test_audio_buffer_keeps_chunks_and_trims_whole_ones_from_the_front():
    buffer = AudioBuffer()
    for value in range(4):
        buffer.append(np.full(100, value * 1000, dtype=np.int16))
    assert buffer.end == 400
    buffer.trim(250)
    assert buffer.start == 200  # the chunk holding sample 250 stays
    tail = buffer.since(250)
    assert tail.size == 150 and tail[0] == pytest.approx(2000 / 32768)
