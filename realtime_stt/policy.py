"""The streaming policy, pure: words of successive decodes in, committed and tentative words out.

LocalAgreement-2 decides which words stand; LanguageGuess decides when a detected language is sure
enough for words to count; the rest are guards on what a decode may add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from realtime_stt.words import Word, join_words, norm


def repetition_start(words: Sequence[Word], max_ngram: int = 8, max_repeats: int = 3) -> int | None:
    """Where a decoding loop starts (after the loop's first round), else None.

    Whisper's classic failure on streams is a loop ('the the the the ...') that runs to the end of
    its output; such a tail must never be committed. A repetition followed by other words is
    speech ('words words words words, and that is all') and stays.
    """
    keys = [norm(w.text) for w in words]
    best = None
    for n in range(1, max_ngram + 1):
        start = len(keys) - n  # walk back while the words repeat with period n
        while start > 0 and keys[start - 1] == keys[start - 1 + n]:
            start -= 1
        if len(keys) - start >= n * (max_repeats + 1) and (best is None or start + n < best):
            best = start + n  # keep the first round, drop the repeats
    return best


def repeated_head(before: Sequence[Word], after: Sequence[Word], most: int = 5) -> int:
    """How many of ``after``'s first words read ``before``'s last ones again (up to ``most``)."""
    tail = [norm(w.text) for w in before[-most:]]
    head = [norm(w.text) for w in after[:most]]
    return next((n for n in range(min(len(tail), len(head)), 0, -1) if tail[-n:] == head[:n]), 0)


def without_rereading(before: Sequence[Word], added: Sequence[Word], least: int = 2) -> list[Word]:
    """``added`` less the stretches (``least`` words or more) that read ``before``'s words again from
    the same audio: their times overlap. A stretch said twice lies in the audio twice, at two times,
    and stays."""
    matcher = SequenceMatcher(None, [norm(w.text) for w in before], [norm(w.text) for w in added], autojunk=False)
    dropped: set[int] = set()
    for block in matcher.get_matching_blocks():
        if block.size < least:
            continue
        old, new = before[block.a : block.a + block.size], added[block.b : block.b + block.size]
        if min(old[-1].end, new[-1].end) > max(old[0].start, new[0].start):
            dropped.update(range(block.b, block.b + block.size))
    return [word for index, word in enumerate(added) if index not in dropped]


@dataclass
class LanguageGuess:
    """An utterance's language, guessed from the partial decodes' detections until it is settled.

    Whisper's detection on a second of speech is often wrong, and sometimes sure of it; with more
    speech it is right, and sure when right (``python -m bench.language``, docs/design.md). It is
    settled by the first detection on at least SURE_SPEECH seconds of speech with SURE_PROBABILITY,
    or else, once MOST_SPEECH seconds were heard or the window is full, on the language with the
    most evidence (probability times speech, summed over the detections). Until then partials
    commit and show nothing, so no word of a wrong guess is left on screen.
    """

    SURE_SPEECH = 1.5
    SURE_PROBABILITY = 0.7
    MOST_SPEECH = 3.0

    language: str | None = None
    settled: bool = False
    evidence: dict[str, float] = field(default_factory=dict)

    def observe(self, language: str | None, probability: float, speech: float, *, window_full: bool) -> None:
        """Take one detection: ``language`` with ``probability`` on ``speech`` seconds of speech."""
        if self.settled:
            return
        if language is not None and speech > 0:
            self.evidence[language] = self.evidence.get(language, 0.0) + probability * speech
            if speech >= self.SURE_SPEECH and probability >= self.SURE_PROBABILITY:
                self.language, self.settled = language, True
                return
        if self.evidence and (window_full or speech >= self.MOST_SPEECH):
            self.language, self.settled = max(self.evidence, key=self.evidence.__getitem__), True


class LocalAgreement:
    """LocalAgreement-2 (Macháček et al. 2023) over a sliding decode window.

    Each ``update`` takes the words of a decode of the window (times in seconds from the utterance
    start) and commits the prefix that the previous hypothesis agrees with. Committed words never
    change; the rest of the latest hypothesis is tentative. The window keeps some committed audio
    before the uncommitted part, because Whisper misreads a word cut in half; it slides forward,
    preferably to a sentence end, once it spans more than ``window_seconds`` (or the shorter span
    an update asks for).
    """

    SENTENCE_END = (".", "?", "!", "。", "？", "！")
    # Whisper's stock hallucinations on a window that ends in silence ('Okay.', 'Thank you.') can
    # repeat across two decodes; they come with low probability, so an agreed tail of such words
    # waits for more audio. A doubtful word followed by agreed, confident ones is committed.
    MIN_COMMIT_PROBABILITY = 0.5

    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = window_seconds
        self.window_start = 0.0
        self.audio_end = 0.0  # where the latest hypothesis's audio ended
        self.committed: list[Word] = []
        self.tentative: list[Word] = []

    @property
    def committed_end(self) -> float:
        return self.committed[-1].end if self.committed else 0.0

    def fresh(self, words: Sequence[Word]) -> list[Word]:
        """The part of a hypothesis that comes after the committed words.

        The window starts on committed audio, so a hypothesis opens by reading committed words
        again; they are told apart by time, and by text where times mislead. Word times come from
        aligning the text to the audio: a decode that skipped the committed speech crams its new
        words into that speech's time, and dropping them by time alone would lose them for good.
        A head that repeats the committed tail (1 to 5 words) is dropped; a repetition loop is cut off.
        """
        split = next((i for i, w in enumerate(words) if w.start >= self.committed_end - 0.1), len(words))
        head, new = list(words[:split]), list(words[split:])
        if head:
            since = max(self.window_start, head[0].start)
            reread = [norm(w.text) for w in self.committed if w.end > since]
            matcher = SequenceMatcher(None, reread, [norm(w.text) for w in head], autojunk=False)
            last = [block for block in matcher.get_matching_blocks() if block.size][-1:]
            if len(head) < len(reread) / 2 and matcher.ratio() < 0.5:
                new = [*head, *new]  # too few words, and others, to be a reading of the committed ones
            elif last and last[0].a + last[0].size == len(reread):
                new = [*head[last[0].b + last[0].size :], *new]  # read up to the committed end
        if new and self.committed and new[0].start < self.committed_end + 1.0:
            new = new[repeated_head(self.committed, new) :]
        cut = repetition_start(new)
        return new if cut is None else new[:cut]

    def update(self, words: Sequence[Word], audio_end: float, *, commit: bool = True, span: float | None = None) -> list[Word]:
        """Take the hypothesis for the window ending at ``audio_end``; return the newly committed words.

        With ``commit`` false it only becomes the hypothesis the next one is compared with: nothing
        is committed and the window stays where it is. A ``span`` shorter than ``window_seconds``
        slides the window once it spans more than that, for cheaper decodes under load; words are
        still forced in only after half of ``window_seconds`` without agreement.
        """
        hypothesis = self.fresh(words)
        self.audio_end = audio_end
        if not commit:
            self.tentative = hypothesis
            return []
        agreed = 0
        for old, new in zip(self.tentative, hypothesis):
            if norm(old.text) != norm(new.text):
                break
            agreed += 1
        while agreed and hypothesis[agreed - 1].probability < self.MIN_COMMIT_PROBABILITY:
            agreed -= 1
        newly = hypothesis[:agreed]
        self.committed.extend(newly)
        self.tentative = hypothesis[agreed:]
        span = min(self.window_seconds, span or self.window_seconds)
        if audio_end - self.window_start > span:
            newly += self._slide(audio_end, span)
        return newly

    def _slide(self, audio_end: float, span: float) -> list[Word]:
        forced: list[Word] = []
        if audio_end - self.committed_end > self.window_seconds / 2:
            # Two decodes have not agreed for half a window: commit the older tentative words rather
            # than let the window (and every decode) grow without bound.
            limit = audio_end - self.window_seconds / 2
            count = next((i for i, w in enumerate(self.tentative) if w.end > limit), len(self.tentative))
            forced, self.tentative = self.tentative[:count], self.tentative[count:]
            self.committed.extend(forced)
        inside = [i for i, w in enumerate(self.committed) if w.end > self.window_start]
        if not inside:
            self.window_start = max(self.window_start, audio_end - self.window_seconds / 2)
            return forced
        # Cut after a sentence end, where a pause keeps the next word whole. Elsewhere the next word
        # often starts where the last committed one ends (aligned ends are often late), and a cut
        # there clips its onset ('las arenas son' read as 'para en las'): that committed word stays
        # in the window, read again and dropped by `fresh`, and the cut is at the end of the one
        # before it. Never midway to the next word: aligned starts are often late too, and a
        # window that clips an onset can make Whisper skip the whole sentence after it.
        cut = inside[-1] - 1
        for i in reversed(inside):
            if self.committed[i].text.rstrip().endswith(self.SENTENCE_END):
                if audio_end - self.committed[i].end <= span:
                    cut = i
                break
        if cut >= 0:
            self.window_start = max(self.window_start, self.committed[cut].end)
        return forced

    # Shown tentative words stop before the first doubtful or cut-off one: showing every tentative
    # word rewrites shown words many times as often, for a few points of coverage (docs/design.md). The
    # newest word is most often the one the audio cut in half, so it is held back unless the decoder
    # is sure of it and audio after it was heard: then it was whole, and a word shown sooner.
    SHOW_MIN_PROBABILITY = 0.7
    SHOW_NEWEST_PROBABILITY = 0.95
    SHOW_NEWEST_AFTER_SECONDS = 0.2

    def shown_tentative(self) -> list[Word]:
        """The tentative words worth showing: likely to survive the next decode."""
        shown = []
        for index, word in enumerate(self.tentative):
            if word.probability < self.SHOW_MIN_PROBABILITY or word.text.rstrip().endswith(("-", "...", "…")):
                break
            if index == len(self.tentative) - 1 and not self._newest_is_whole(word):
                break
            shown.append(word)
        # Whisper writes a spoken number in digits and re-formats it as more of it is heard ('1 0'
        # read again as '10,001', '18' as '1802'): a number at the end waits for a word after it.
        while shown and any(character.isdigit() for character in shown[-1].text):
            shown.pop()
        return shown

    def _newest_is_whole(self, word: Word) -> bool:
        return (
            word.probability >= self.SHOW_NEWEST_PROBABILITY
            and self.audio_end - word.end >= self.SHOW_NEWEST_AFTER_SECONDS
        )

    def prompt(self, max_chars: int = 200) -> str | None:
        """Committed text before the window: context for the decoder, never decoded again."""
        before = [w for w in self.committed if w.end <= self.window_start]
        return join_words(before)[-max_chars:] or None

    def final(self, words: Sequence[Word]) -> list[Word]:
        """The utterance's words: the committed ones, then what a last decode of the window adds."""
        return [*self.committed, *self.fresh(words)]
