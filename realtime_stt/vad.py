"""Speech activity: Silero VAD (as shipped in faster-whisper) scoring a stream as it arrives."""

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


class SpeechActivity:
    """Where in an utterance the speaker was talking, scored 32 ms at a time as the audio arrives.

    A frame counts as speech from Silero's lower threshold up: faster-whisper's VAD keeps a speech
    chunk going until the score falls below it, and whispered words score little more. Only the last
    speech frame matters to the session.
    """

    def __init__(self, threshold: float = VAD_OPTIONS.neg_threshold or VAD_OPTIONS.threshold - 0.15) -> None:
        self.threshold = threshold
        self.frames = 0  # frames scored
        self.last_speech = -1  # index of the last frame scored as speech, -1 before any
        self.vad_state = VadState()

    @property
    def scored_until(self) -> int:
        return self.frames * VAD_FRAME

    def add(self, probabilities: np.ndarray) -> None:
        loud = np.flatnonzero(probabilities >= self.threshold)
        if loud.size:
            self.last_speech = self.frames + int(loud[-1])
        self.frames += probabilities.size

    def heard(self) -> bool:
        return self.last_speech >= 0

    def silent_since(self, sample: int) -> bool:
        """No frame scored as speech ends after ``sample``."""
        return (self.last_speech + 1) * VAD_FRAME <= sample

    def trailing_silence(self) -> float:
        """Seconds since the speech stopped, as far as it is scored."""
        return (self.frames - 1 - self.last_speech) * VAD_FRAME / SAMPLE_RATE
