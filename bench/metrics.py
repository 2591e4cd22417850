"""Pure figures of a streaming run: plain values in, numbers out (tested without a server)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from functools import cache

CER_LANGUAGES = {"ja", "zh", "ko"}  # no spaces between words: score characters


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@cache
def _normalizer(language: str):
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def units(text: str, language: str) -> list[str]:
    """Normalised words (characters for ja/zh/ko), as the eval set's README says to score. The
    English normaliser keeps a trailing '...' as a '.' of its own (it keeps decimal points): that
    is no word, and a partial that then went on would count as rewriting it."""
    normalized = _normalizer(language)(text)
    if language in CER_LANGUAGES:
        return [c for c in normalized if not c.isspace()]
    return [unit for unit in normalized.split() if any(c.isalnum() for c in unit)]


def error_rate(pairs: Sequence[tuple[str, str, str]]) -> float | None:
    """Pooled WER/CER over (reference, hypothesis, language) triples: all errors / all reference units."""
    import jiwer

    references = [" ".join(units(r, lang)) for r, _, lang in pairs]
    hypotheses = [" ".join(units(h, lang)) for _, h, lang in pairs]
    kept = [(r, h) for r, h in zip(references, hypotheses) if r]
    if not kept:
        return None
    return jiwer.wer([r for r, _ in kept], [h for _, h in kept])


def flicker(partials: Sequence[str], language: str = "en") -> tuple[int, int, int]:
    """(rewrites, strict rewrites, updates) over a sequence of partial texts.

    An update is a partial whose normalised words differ from the previous one's. It is a rewrite
    when a word the previous partial showed, other than its last one (which may still be half
    spoken), is changed or gone; strict rewrites count a changed last word too. Flicker is
    rewrites / updates.
    """
    rewrites = strict = updates = 0
    previous: list[str] | None = None
    for text in partials:
        words = units(text, language)
        if previous is not None and words != previous:
            updates += 1
            if words[: len(previous)] != previous:
                strict += 1
                if previous and words[: len(previous) - 1] != previous[:-1]:
                    rewrites += 1
        previous = words
    return rewrites, strict, updates


def coverage(final: str, last_partial: str, language: str = "en") -> tuple[int, int]:
    """(final units found in the last partial, final units): in-order matches (difflib blocks)."""
    final_units, partial_units = units(final, language), units(last_partial, language)
    matcher = difflib.SequenceMatcher(a=final_units, b=partial_units, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()), len(final_units)


def committed_revisions(committed: Sequence[str]) -> int:
    """Partials whose committed text is not an extension of the previous one (must be 0)."""
    return sum(1 for before, after in zip(committed, committed[1:]) if not after.startswith(before))


def word_latency(
    words: Sequence[tuple[str, float, float]], partials: Sequence[tuple[float, str, str]], language: str = "en"
) -> tuple[list[float | None], list[float | None]]:
    """When each spoken word was first shown, and first committed, after it was spoken.

    ``words`` are the offline decode's (text, start, end), seconds from the first audio; ``partials``
    are (arrival, committed, text) on the same clock, the partials received before the stop. A word
    is shown by the first partial whose text holds it, in order (difflib blocks over normalised
    units), at or after the word's start: a match before the word was even begun is a coincidence
    of another word. Its latency is that partial's arrival minus the word's end; None if no partial
    before the stop held it.
    """
    reference, owner = [], []
    for index, (text, _, _) in enumerate(words):
        for unit in units(text, language):
            reference.append(unit)
            owner.append(index)
    shown: list[float | None] = [None] * len(words)
    committed: list[float | None] = [None] * len(words)
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq1(reference)
    for arrival, committed_text, text in partials:
        for found, hypothesis in ((shown, text), (committed, committed_text)):
            matcher.set_seq2(units(hypothesis, language))
            for block in matcher.get_matching_blocks():
                for k in range(block.a, block.a + block.size):
                    word = owner[k]
                    if found[word] is None and arrival >= words[word][1]:
                        found[word] = arrival - words[word][2]
    return shown, committed
