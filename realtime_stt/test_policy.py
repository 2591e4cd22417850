"""The streaming policy with plain values: LocalAgreement, the language guess, the guards."""

from __future__ import annotations

import numpy as np

from realtime_stt.policy import LanguageGuess, LocalAgreement, repetition_start, without_rereading
from realtime_stt.words import Word


def words(text: str, start: float = 0.0, step: float = 0.5, probability: float = 0.9) -> list[Word]:
    """' If the reader' -> Words half a second apart, spelled the way Whisper spells them."""
    return [
        Word(start + i * step, start + i * step + step * 0.8, " " + token, probability)
        for i, token in enumerate(text.split())
    ]


def texts(ws: list[Word]) -> str:
    return "".join(w.text for w in ws).strip()


def test_words_two_hypotheses_agree_on_are_committed_the_rest_is_tentative():
    policy = LocalAgreement(window_seconds=6.0)
    assert policy.update(words("if the reed"), 1.5) == []
    assert texts(policy.tentative) == "if the reed"
    newly = policy.update(words("If the reader will"), 2.0)
    assert texts(newly) == "If the"  # case and punctuation do not block agreement
    assert texts(policy.tentative) == "reader will"
    policy.update(words("If the reader will excuse me,"), 3.0)
    assert texts(policy.committed) == "If the reader will"
    assert texts(policy.tentative) == "excuse me,"


def test_only_tentative_words_likely_to_survive_are_shown():
    policy = LocalAgreement(window_seconds=6.0)
    policy.update(words("the narrative would be") + [Word(2.0, 2.3, " tedious", 0.4)] + words("to him", start=2.5), 3.5)
    assert texts(policy.shown_tentative()) == "the narrative would be"  # stops before the doubtful word
    policy.update(words("a narrator could be te-"), 2.5)
    assert texts(policy.shown_tentative()) == "a narrator could be"  # the newest word is held back
    policy.update(words("a narrator co- would be tedious"), 3.0)
    assert texts(policy.committed) == "a narrator"
    assert policy.shown_tentative() == []  # nothing from a cut-off word on


def test_the_newest_word_is_shown_only_when_sure_and_followed_by_audio():
    policy = LocalAgreement(window_seconds=6.0)
    # words() spaces words 0.5 s apart: 'reader' ends at 1.4 s.
    policy.update(words("if the reader"), 1.5)
    assert texts(policy.shown_tentative()) == "if the"  # it may be cut off where the audio ends
    policy.update(words("if a reader", probability=0.97), 1.9)
    assert texts(policy.shown_tentative()) == "a reader"  # sure, and 0.5 s of audio after it
    policy.update(words("a reader will", start=0.5) + [Word(1.5, 1.6, " ex", 0.8)], 1.9)
    assert texts(policy.shown_tentative()) == "will"  # not sure of 'ex': held back


def test_a_number_at_the_end_of_the_shown_words_waits_for_the_word_after_it():
    policy = LocalAgreement(window_seconds=6.0)
    # 'now' ends at 2.4 s, 0.1 s before the audio does: held back, and so are the digits before it.
    policy.update(words("dial 1 0 0 now", probability=0.97), 2.5)
    assert texts(policy.shown_tentative()) == "dial"
    policy.update(words("dial 1 0 0 now", probability=0.97), 3.0, commit=False)
    assert texts(policy.shown_tentative()) == "dial 1 0 0 now"  # a word after the number: it stands
    policy.update(words("the year 18", probability=0.97), 2.0, commit=False)
    assert texts(policy.shown_tentative()) == "the year"  # '18' may yet be '1802'


def test_committed_words_are_never_revised_even_when_a_later_decode_disagrees():
    policy = LocalAgreement(window_seconds=6.0)
    policy.update(words("the narrative would be"), 2.0)
    policy.update(words("the narrative would be tedious"), 2.5)
    committed = list(policy.committed)
    policy.update(words("a narrator could be tedious to him"), 3.5)
    assert policy.committed[: len(committed)] == committed
    # Only words after the committed ones count: 'tedious' agrees with the last tentative word.
    assert texts(policy.committed) == "the narrative would be tedious"


def test_a_hypothesis_that_repeats_the_committed_tail_is_not_committed_twice():
    policy = LocalAgreement(window_seconds=6.0)
    policy.update(words("ask not what your"), 2.0)
    policy.update(words("ask not what your country"), 2.5)
    assert texts(policy.committed) == "ask not what your"
    # Loose word times: the next decode starts with 'your' again, timed just before its end.
    late = [Word(1.55, 1.9, " your"), Word(2.0, 2.4, " country"), Word(2.5, 2.9, " can")]
    policy.update(late, 3.0)
    policy.update(late, 3.5)
    assert texts(policy.committed) == "ask not what your country can"


def test_new_words_crammed_into_committed_time_are_not_lost():
    # Seen with tiny.en: the decode skipped the sentence already committed, and the word alignment
    # spread the next sentence's first words over that sentence's time.
    policy = LocalAgreement(window_seconds=10.0)
    sentence = words("nor of the circumstances which led me to leave my native country.")
    policy.update(sentence, 6.5)
    policy.update(sentence, 7.0)
    assert texts(policy.committed).endswith("native country.")
    crammed = [Word(0.0, 2.5, " The", 0.9), Word(2.5, 2.52, " narrative"), Word(2.52, 6.6, " would"), Word(6.6, 6.8, " be")]
    policy.update([*crammed, Word(6.8, 7.2, " tedious")], 7.5)
    policy.update([*crammed, Word(6.8, 7.2, " tedious"), Word(7.2, 7.5, " to")], 8.0)
    assert texts(policy.committed).endswith("native country. The narrative would be tedious")
    # The other way a skip shows: the committed words are read again, then new ones crammed in
    # before the committed end. Those after the last committed word are new.
    policy = LocalAgreement(window_seconds=10.0)
    policy.update(words("ask not what your country can do"), 3.5)
    policy.update(words("ask not what your country can do"), 4.0)
    reread = words("ask not what your country can do for you", step=0.35)
    policy.update([*reread, Word(3.5, 3.8, " ask")], 4.0)
    policy.update([*reread, Word(3.5, 3.8, " ask"), Word(3.8, 4.1, " what")], 4.5)
    assert texts(policy.committed) == "ask not what your country can do for you ask"


def test_repetition_loops_are_cut_and_never_committed():
    loop = words("and the the the the the the")
    assert repetition_start(loop) == 2
    assert repetition_start(words("we are we are we are we are we are")) == 2
    assert repetition_start(words("1 0 8 0 3 0 1 8 0 3 0 1 8 0 3 0 1 8 0 3 0 1 8 0 3 0 1")) == 7
    assert repetition_start(words("words words words and that")) is None  # three in a row is speech
    assert repetition_start(words("more words words words words and that should be all")) is None
    policy = LocalAgreement(window_seconds=6.0)
    policy.update(loop, 3.5)
    policy.update(loop, 4.0)
    assert texts(policy.committed) == "and the"


def test_low_probability_words_wait_for_more_audio():
    policy = LocalAgreement(window_seconds=6.0)
    hypothesis = words("to myself.") + [Word(1.2, 1.5, " Okay.", 0.2)]
    policy.update(hypothesis, 1.6)
    policy.update(hypothesis, 2.1)
    assert texts(policy.committed) == "to myself."
    assert texts(policy.tentative) == "Okay."


def test_a_doubtful_word_inside_agreed_speech_does_not_hold_back_the_words_after_it():
    policy = LocalAgreement(window_seconds=6.0)
    hypothesis = words("which led") + [Word(1.0, 1.3, " me", 0.3)] + words("to leave my", start=1.5)
    policy.update(hypothesis, 3.0)
    policy.update(hypothesis, 3.5)
    assert texts(policy.committed) == "which led me to leave my"


def test_the_window_slides_to_a_sentence_end_and_bounds_every_decode():
    policy = LocalAgreement(window_seconds=6.0)
    speech = words("I will say nothing. Nor of the circumstances which led me to leave my native country")
    for end in np.arange(1.0, 9.0, 0.5):
        heard = [w for w in speech if w.end <= end]
        policy.update([w for w in heard if w.start >= policy.window_start - 0.5], float(end))
        assert end - policy.window_start <= 6.0 + 0.5
    # The first slide cut right after 'nothing.', between words, so no word is cut in half.
    first_cut = (speech[3].end + speech[4].start) / 2
    assert policy.window_start >= first_cut
    assert texts(policy.committed).startswith("I will say nothing. Nor of the circumstances")
    assert policy.prompt() is not None and policy.prompt().startswith("I will say nothing.")


def test_without_agreement_old_words_are_forced_in_so_the_window_stays_bounded():
    policy = LocalAgreement(window_seconds=4.0)
    for i, end in enumerate(np.arange(1.0, 12.0, 0.5)):
        # Every decode disagrees on every word: nothing would ever be committed by agreement.
        policy.update([Word(t, t + 0.3, f" w{i}_{t}") for t in np.arange(policy.window_start, end - 0.3, 0.5)], end)
        assert end - policy.window_start <= 4.0 + 0.5
    assert policy.committed


def test_a_shorter_span_slides_the_window_sooner_but_forces_no_words_sooner():
    speech = words("I will say nothing. Nor of the circumstances which led me to leave my native country")
    full, short = LocalAgreement(window_seconds=6.0), LocalAgreement(window_seconds=6.0)
    widest = {}
    for end in np.arange(1.0, 9.0, 0.5):
        heard = [w for w in speech if w.end <= end]
        for name, policy, span in (("full", full, None), ("short", short, 3.0)):
            policy.update([w for w in heard if w.start >= policy.window_start - 0.5], float(end), span=span)
            widest[name] = max(widest.get(name, 0.0), end - policy.window_start)
    assert widest["full"] > 4.5 and widest["short"] <= 3.0 + 0.5, widest
    # The same words committed: a shorter window changes what is decoded again, not what is agreed.
    assert texts(short.committed) == texts(full.committed)
    # Half of window_seconds without agreement still forces words in, not half of the span.
    stuck = LocalAgreement(window_seconds=6.0)
    for i, end in enumerate(np.arange(1.0, 3.5, 0.5)):  # the window passes the span from 2.5 s on
        stuck.update([Word(t, t + 0.3, f" w{i}_{t}") for t in np.arange(stuck.window_start, end - 0.3, 0.5)], end, span=2.0)
    assert not stuck.committed
    stuck.update([Word(t, t + 0.3, f" x{t}") for t in np.arange(0.0, 3.2, 0.5)], 3.5, span=2.0)
    assert stuck.committed and stuck.committed[-1].end <= 3.5 - 3.0


def test_a_slide_away_from_a_sentence_end_keeps_the_last_committed_word_whole_in_the_window():
    # Words that touch (no pause between them, as aligned words often do): a cut at the last
    # committed word's end would clip the onset of the word after it.
    spaced = words("las arenas son blanquecinas de grano medio y tiene muy poca", step=0.4)
    speech = [Word(w.start, w.start + 0.4, w.text, w.probability) for w in spaced]
    policy = LocalAgreement(window_seconds=6.0)
    slid = []
    for end in np.arange(1.0, 4.6, 0.5):
        heard = [w for w in speech if w.end <= end and w.start >= policy.window_start - 0.05]
        before = policy.window_start
        policy.update(heard, float(end), span=2.0)
        if policy.window_start > before:
            slid.append(policy.window_start)
            # The last committed word is read again whole; the word after it is not cut.
            assert policy.window_start <= policy.committed[-1].start, (policy.window_start, texts(policy.committed))
    assert slid, "the window never slid"
    # Read again, it is not committed twice.
    assert texts(policy.committed) == texts(speech[: len(policy.committed)])


def test_final_is_the_committed_words_plus_what_the_last_decode_adds():
    policy = LocalAgreement(window_seconds=6.0)
    policy.update(words("painful to myself"), 1.5)
    policy.update(words("painful to myself"), 2.0)
    assert texts(policy.final(words("painful to myself and him", start=0.0))) == "painful to myself and him"


def test_a_tail_decode_that_reads_the_final_again_adds_only_what_is_new():
    final = words("mientras le hablaba Carlos y las palabras a duras penas", start=10.0)
    # The tail decode started too early, at 'Carlos' (11.5 s): its first words read the same audio again.
    tail = words("Carlos y las palabras a duras penas reprimidas que asomaron", start=11.5)
    assert texts(without_rereading(final, tail)) == "reprimidas que asomaron"
    # Said twice, the same words lie in the audio twice, at other times: they stay.
    again = words("mientras le hablaba Carlos", start=20.0)
    assert texts(without_rereading(final, again)) == "mientras le hablaba Carlos"
    # A single word in common is no stretch.
    assert texts(without_rereading(final, words("y luego", start=14.0))) == "y luego"


def test_a_language_is_settled_only_on_enough_speech():
    guess = LanguageGuess()
    guess.observe("ar", 0.93, 1.0, window_full=False)  # sure, but on a second of speech
    assert not guess.settled and guess.language is None
    guess.observe("es", 0.46, 1.6, window_full=False)  # enough speech, but unsure
    assert not guess.settled
    guess.observe("es", 0.8, 2.1, window_full=False)
    assert guess.settled and guess.language == "es"
    guess.observe("pt", 0.99, 3.0, window_full=False)  # settled stays settled
    assert guess.language == "es"


def test_an_unsure_language_is_settled_on_the_most_evidence_after_enough_speech():
    guess = LanguageGuess()
    for language, probability, speech in [("en", 0.6, 1.0), ("zh", 0.41, 2.0), ("en", 0.65, 2.5)]:
        guess.observe(language, probability, speech, window_full=False)
    assert not guess.settled
    guess.observe("zh", 0.44, 3.0, window_full=False)
    assert guess.settled and guess.language == "en"  # 0.6 + 1.625 against 0.82 + 1.32
    # Silence gives no evidence; a full window settles on what there is, and nothing settles on nothing.
    quiet = LanguageGuess()
    quiet.observe(None, 0.0, 0.0, window_full=True)
    assert not quiet.settled
    quiet.observe("de", 0.3, 0.5, window_full=True)
    assert quiet.settled and quiet.language == "de"
