"""The utterance's audio buffer, and when it awaits its first words."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_stt.pipeline import AudioBuffer, Utterance
from realtime_stt.policy import LanguageGuess, LocalAgreement
from realtime_stt.words import Word


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40_000).map(lambda n: ("append", n)), st.integers(0, 120_000).map(lambda n: ("trim", n))),
                max_size=30), st.randoms(use_true_random=False))
def test_audio_buffer_reads_what_was_appended_from_where_it_is_kept(steps, rng):
    """Against a plain list of everything appended: each read is the float32 audio from the sample
    asked for (or the first kept) to the end, read-only, and stays so while more is appended and
    the buffer grows; trims keep the latest sample asked for (at most the end)."""
    buffer, appended, start, reads = AudioBuffer(), np.zeros(0, dtype=np.int16), 0, []
    for kind, n in steps:
        if kind == "append":
            samples = np.array([rng.randint(-32768, 32767) for _ in range(min(n, 50))] * (n // 50 + 1), dtype=np.int16)[:n]
            buffer.append(samples)
            appended = np.concatenate([appended, samples])
        else:
            buffer.trim(n)
            start = min(max(start, n), appended.size)
        assert (buffer.start, buffer.end) == (start, appended.size)
        sample = rng.randint(0, appended.size + 100)
        read = buffer.since(sample)
        expected = appended[min(max(sample, start), appended.size) :].astype(np.float32) / 32768.0
        assert np.array_equal(read, expected) and not read.flags.writeable
        reads.append((read, expected.copy()))
    assert all(np.array_equal(read, expected) for read, expected in reads)  # later appends changed no read


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
