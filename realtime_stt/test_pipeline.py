"""The utterance's audio buffer, and when it awaits its first words."""

from __future__ import annotations

import numpy as np
import pytest

from realtime_stt.pipeline import AudioBuffer, Utterance
from realtime_stt.policy import LanguageGuess, LocalAgreement
from realtime_stt.words import Word


def test_audio_buffer_keeps_chunks_and_trims_whole_ones_from_the_front():
    buffer = AudioBuffer()
    for value in range(4):
        buffer.append(np.full(100, value * 1000, dtype=np.int16))
    assert buffer.end == 400
    buffer.trim(250)
    assert buffer.start == 200  # the chunk holding sample 250 stays
    tail = buffer.since(250)
    assert tail.size == 150 and tail[0] == pytest.approx(2000 / 32768)


def test_an_utterance_awaits_its_first_words_from_speech_until_a_word_shows():
    utterance = Utterance(LocalAgreement(6.0), language=LanguageGuess("en", settled=True))
    assert not utterance.awaits_first_words  # nobody has spoken yet
    utterance.speech.add(np.array([0.1, 0.9], dtype=np.float32))
    assert utterance.awaits_first_words
    utterance.policy.update([Word(0.0, 0.3, " Go", 0.4)], 0.5)  # a doubtful newest word: not shown
    assert utterance.awaits_first_words
    utterance.policy.update([Word(0.0, 0.3, " Go", 0.6), Word(0.3, 0.8, " forward", 0.99)], 1.0)  # agreed: committed
    assert not utterance.awaits_first_words
    detecting = Utterance(LocalAgreement(6.0), language=LanguageGuess(None, settled=False))
    detecting.speech.add(np.array([0.9], dtype=np.float32))
    assert not detecting.awaits_first_words  # with detection, words wait for enough speech instead
