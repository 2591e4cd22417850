"""Every session's audio as it arrives (``AudioBuffer``) and what the server computes of it: Silero's
speech scores and the log-mel frames, for all sessions in one worker-thread call a round.

Each session asked for its new audio to be scored as it came (ten times a second a speaker): one
hop from the event loop to a thread and back, and one VAD call, each. Now a session's request waits
for the round under way to end, and the next round takes every request that came meanwhile: at low
load a round is one request, as before; under load one hop serves every session, and the frames of
all of them go through one FFT and one matrix product (features.py).
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from realtime_stt.features import HOP, KeptFrames, MelFrames, log_mel
from realtime_stt.vad import VAD_FRAME, SpeechActivity, speech_probabilities, speech_spans


class AudioBuffer:
    """Utterance audio as a list of int16 chunks, trimmed from the front, concatenated on demand."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._ends: list[int] = []  # each chunk's end (sample index from the utterance start)
        self.start = 0  # sample index (from the utterance start) of the first sample kept
        self.end = 0  # samples received so far

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self.end += samples.size
            self._ends.append(self.end)

    def since(self, sample: int) -> np.ndarray:
        """float32 audio from ``sample`` (clamped to what is kept) to the end; its chunk by bisection."""
        first = bisect.bisect_right(self._ends, sample)
        if first == len(self._chunks):
            return np.zeros(0, dtype=np.float32)
        skip = max(0, sample - (self._ends[first] - self._chunks[first].size))
        audio = np.concatenate(self._chunks[first:])[skip:] if first + 1 < len(self._chunks) else self._chunks[first][skip:]
        return audio.astype(np.float32) / 32768.0

    def trim(self, sample: int) -> None:
        """Drop whole chunks that end before ``sample``."""
        while self._chunks and self._ends[0] <= sample:
            self.start += self._chunks.pop(0).size
            self._ends.pop(0)


# A round waits this long for more sessions' audio when the last one began this recently.
GATHER_SECONDS = 0.02
BUSY_WITHIN_SECONDS = 0.05


@dataclass(frozen=True)
class Heard:
    """What a session already computed of its partial window as the audio came: the window's VAD
    and features are taken from it, not computed again (decoder.decode_batch)."""

    start: int  # the window's first sample in the utterance, on the frame grid (features.window_grid)
    scores: np.ndarray  # Silero's score of every frame of the utterance scored so far
    kept: KeptFrames | None  # the utterance's log-mel frames (None for a final: decoder.decode_window)

    def spans(self, size: int) -> list[dict]:
        """The window's speech chunks (samples of the window), each start and every end but the last
        moved back onto the frame grid (by less than 10 ms), where the kept frames lie."""
        chunks = speech_spans(self.scores, self.start, self.start + size)
        for chunk in chunks[:-1]:
            chunk["end"] -= chunk["end"] % HOP
        for chunk in chunks:
            chunk["start"] -= chunk["start"] % HOP
        return [c for c in chunks if c["end"] > c["start"]]


@dataclass
class _Request:
    speech: SpeechActivity
    mel: MelFrames
    audio: np.ndarray  # float32, from sample ``start`` of the utterance to its newest
    start: int
    future: asyncio.Future[None]
    since: tuple[int, int] = (0, 0)  # the frames scored and kept when it was asked


class Frontend:
    """The rounds of scoring; ``run`` serves them until cancelled (Engine.start starts it)."""

    def __init__(self, filters: np.ndarray, rounds: Histogram) -> None:
        self.filters = filters  # the model's mel filter bank
        self._rounds = rounds  # observes the requests each round serves
        self._pending: list[_Request] = []
        self._wake = asyncio.Event()

    async def listen(self, speech: SpeechActivity, mel: MelFrames, audio: np.ndarray, start: int) -> None:
        """Score ``audio`` (float32 from sample ``start``, which is at most where ``speech`` and
        ``mel`` go on from) and add its scores and frames to them, in the next round."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(speech, mel, audio, start, future, (speech.frames, mel.count)))
        self._wake.set()
        await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_round = -1.0
        while True:
            await self._wake.wait()
            if loop.time() - last_round < BUSY_WITHIN_SECONDS:
                # Rounds come back to back: many sessions stream. Waiting a moment lets more of them
                # share the round (each hop to a thread and back costs the loop as much as a
                # session's scoring), at the cost of that moment before a partial's window is read.
                await asyncio.sleep(GATHER_SECONDS)
            self._wake.clear()
            last_round = loop.time()
            requests, self._pending = self._pending, []
            if not requests:
                continue
            self._rounds.observe(len(requests))
            try:
                results = await asyncio.to_thread(self._compute, requests)
            except Exception as exc:  # handed to the sessions that asked, which report it
                for request in requests:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            # Applied here, on the loop, where the sessions read them; only onto what the request
            # was computed from (a request whose session stopped waiting for it, and asked again
            # meanwhile, must not add the same frames twice).
            for request, (probabilities, state, frames) in zip(requests, results):
                if (request.speech.frames, request.mel.count) == request.since:
                    request.speech.add(probabilities)
                    request.speech.vad_state = state
                    request.mel.add(frames)
                if not request.future.done():
                    request.future.set_result(None)

    def _compute(self, requests: list[_Request]) -> list[tuple[np.ndarray, object, np.ndarray]]:
        """In a worker thread: each request's speech scores (Silero carries each session's state,
        so one call each) and the frames of all of them at once."""
        scored = []
        for request in requests:
            speech = request.speech
            skip = speech.scored_until - request.start
            whole = (request.audio.size - skip) // VAD_FRAME * VAD_FRAME
            if whole > 0:
                scored.append(speech_probabilities(request.audio[skip : skip + whole], speech.vad_state))
            else:
                scored.append((np.zeros(0, dtype=np.float32), speech.vad_state))
        pieces = [request.mel.frames_to_add(request.audio, request.start) for request in requests]
        counts = [len(piece) for piece in pieces]
        frames = log_mel(np.concatenate(pieces), self.filters) if sum(counts) else np.zeros((self.filters.shape[0], 0), np.float32)
        split = np.split(frames, np.cumsum(counts)[:-1], axis=1)
        return [(probabilities, state, part) for (probabilities, state), part in zip(scored, split)]
