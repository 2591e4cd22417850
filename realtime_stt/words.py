"""Words: what recognition produces and the streaming policy reasons about, shared by both."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Word:
    """One recognised word; times are seconds from the start of the utterance (or of a window)."""

    start: float
    end: float
    text: str  # as Whisper spells it, with its leading space where the language uses spaces
    probability: float = 1.0


def join_words(words: Sequence[Word]) -> str:
    return "".join(w.text for w in words).strip()


def norm(text: str) -> str:
    """Compare words without case or punctuation: 'me,' agrees with 'Me'."""
    return re.sub(r"[^\w']+", "", text.lower())


def shift(words: Sequence[Word], seconds: float) -> list[Word]:
    """Window-relative word times to utterance times."""
    return [Word(w.start + seconds, w.end + seconds, w.text, w.probability) for w in words]
