"""Speech activity: Silero VAD (as shipped in faster-whisper) scoring a stream as it arrives, and
where a partial window's speech is, found from those scores rather than by scoring the window again."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from faster_whisper.vad import VadOptions, get_vad_model

from realtime_stt.settings import SAMPLE_RATE

VAD_OPTIONS = VadOptions()
VAD_FRAME = 512  # samples Silero scores at a time
VAD_CONTEXT = 64  # samples of the frame before that Silero sees with each frame


@dataclass(frozen=True)
class VadState:
    """Silero's recurrent state and the tail of the last frame it scored, carried between calls."""

    h: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), dtype=np.float32))
    c: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(VAD_CONTEXT, dtype=np.float32))


def speech_probabilities(audio: np.ndarray, state: VadState) -> tuple[np.ndarray, VadState]:
    """Silero's speech probability for each 512-sample frame of ``audio`` (whole frames; a worker-thread
    call), continuing from ``state``: frame by frame the same as faster-whisper's pass over the whole
    audio, whose scores depend on every frame before (without the state they can differ widely)."""
    frames = audio.reshape(-1, VAD_FRAME)
    contexts = np.concatenate([state.context[None], frames[:-1, -VAD_CONTEXT:]])
    batch = np.concatenate([contexts, frames], axis=1)
    output, h, c = get_vad_model().session.run(None, {"input": batch, "h": state.h, "c": state.c})
    return np.asarray(output, dtype=np.float32).reshape(-1), VadState(h, c, frames[-1, -VAD_CONTEXT:].copy())


# Silero's score from which a frame may hold speech, for a decode that must not miss any: fast
# falsetto words scored 0.2-0.3, below the speech threshold (README, "Finals"); the benchmark takes
# speech to begin there too (bench/report.py).
SOUND_THRESHOLD = 0.2


class SpeechActivity:
    """Where in an utterance the speaker was talking, scored 32 ms at a time as the audio arrives.

    A frame counts as speech from Silero's lower threshold up: faster-whisper's VAD keeps a speech
    chunk going until the score falls below it, and whispered words score little more. Only the last
    speech frame matters to the session, and the last frame that may hold speech (``sound_threshold``).
    """

    def __init__(
        self,
        threshold: float = VAD_OPTIONS.neg_threshold or VAD_OPTIONS.threshold - 0.15,
        sound_threshold: float = SOUND_THRESHOLD,
    ) -> None:
        self.threshold = threshold
        self.sound_threshold = min(threshold, sound_threshold)
        self.frames = 0  # frames scored
        self.last_speech = -1  # index of the last frame scored as speech, -1 before any
        self.last_sound = -1  # index of the last frame that may hold speech, -1 before any
        self.vad_state = VadState()
        self._scores = np.empty(1024, dtype=np.float32)  # every frame's probability; grown by replacing

    @property
    def scored_until(self) -> int:
        return self.frames * VAD_FRAME

    def add(self, probabilities: np.ndarray) -> None:
        speech = np.flatnonzero(probabilities >= self.threshold)
        if speech.size:
            self.last_speech = self.frames + int(speech[-1])
        sound = np.flatnonzero(probabilities >= self.sound_threshold)
        if sound.size:
            self.last_sound = self.frames + int(sound[-1])
        if self.frames + probabilities.size > self._scores.size:
            grown = np.empty(max(2 * self._scores.size, self.frames + probabilities.size), dtype=np.float32)
            grown[: self.frames] = self._scores[: self.frames]
            self._scores = grown
        self._scores[self.frames : self.frames + probabilities.size] = probabilities
        self.frames += probabilities.size

    def scores(self) -> np.ndarray:
        """Every frame's probability so far: a view that later frames never change (safe to read in
        another thread while more are added)."""
        return self._scores[: self.frames]

    def heard(self) -> bool:
        return self.last_speech >= 0

    def silent_since(self, sample: int) -> bool:
        """No frame scored as speech ends after ``sample``."""
        return (self.last_speech + 1) * VAD_FRAME <= sample

    def trailing_silence(self) -> float:
        """Seconds since the speech stopped, as far as it is scored."""
        return (self.frames - 1 - self.last_speech) * VAD_FRAME / SAMPLE_RATE

    def quiet_since(self, sample: int) -> bool:
        """No frame that may hold speech ends after ``sample``."""
        return (self.last_sound + 1) * VAD_FRAME <= sample

    def trailing_quiet(self) -> float:
        """Seconds since the last frame that may hold speech, as far as it is scored."""
        return (self.frames - 1 - self.last_sound) * VAD_FRAME / SAMPLE_RATE


def speech_spans(scores: np.ndarray, start: int, end: int, options: VadOptions = VAD_OPTIONS) -> list[dict]:
    """Where the speech is in samples ``start`` to ``end`` of an utterance, as sample ranges of that
    window, by the rules of faster-whisper's VAD filter (``get_speech_timestamps``) applied to the
    frames the stream already scored (``scores``, frame ``k`` being samples 512k to 512k + 512).

    A partial decodes its window's speech alone; scoring the window again (a 6 s window four times a
    second) cost the server more than anything else it did per speaker. The stream's scores carry
    Silero's state from the utterance's start and sit on the utterance's frame grid, so they may
    differ a little from a fresh pass over the window; what is cut is silence of two seconds or
    more, with 400 ms of padding either side, so that moves no word. The rules: speech starts at a
    frame of ``threshold`` or more, and ends where a run of frames below the lower threshold began
    that lasted ``min_silence_duration_ms``; a score in between changes nothing. (Options with a
    longest or shortest chunk are not supported: the server's VAD_OPTIONS have neither.)
    """
    threshold = options.threshold
    lower = options.neg_threshold if options.neg_threshold is not None else max(threshold - 0.15, 0.01)
    min_silence = SAMPLE_RATE * options.min_silence_duration_ms // 1000
    pad = SAMPLE_RATE * options.speech_pad_ms // 1000
    length = end - start
    first = start // VAD_FRAME
    window = scores[first : -(-end // VAD_FRAME)]
    # Only the frames where something can change: loud ones, and quiet ones while speech is open.
    loud = window >= threshold
    changes = np.flatnonzero(loud | (window < lower))
    spans: list[list[int]] = []
    speaking, silence_from = False, None
    for index, is_loud in zip(changes.tolist(), loud[changes].tolist()):
        position = max(0, (first + index) * VAD_FRAME - start)
        if is_loud:
            silence_from = None
            if not speaking:
                speaking = True
                spans.append([position, length])
        elif speaking:
            if silence_from is None:
                silence_from = position
            if position - silence_from >= min_silence:
                spans[-1][1] = silence_from
                speaking, silence_from = False, None
    spans = [span for span in spans if span[1] > span[0]]
    for i, span in enumerate(spans):
        if i == 0:
            span[0] = max(0, span[0] - pad)
        if i + 1 < len(spans):
            gap = spans[i + 1][0] - span[1]
            half = gap // 2 if gap < 2 * pad else pad
            span[1] += half
            spans[i + 1][0] = max(0, spans[i + 1][0] - half)
        else:
            span[1] = min(length, span[1] + pad)
    return [{"start": a, "end": b} for a, b in spans]
