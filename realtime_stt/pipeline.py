"""The utterance pipeline: one speaker's audio in, partials while they talk and a final when they
stop. It knows nothing of WebSockets or JSON: a protocol adapter feeds it bytes, takes its partials
through a callback and asks it for the final.

Per utterance: the audio buffer, speech activity (VAD as the audio arrives), the language guess,
the streaming policy (LocalAgreement over a sliding window), partials on the shared clock grid, a
final decoded ahead of the stop once the speech stops (speculation), and the final itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from realtime_stt.decoder import FINAL_ENCODER, PARTIAL_ENCODER, DecodeOptions, Transcript, token_budget
from realtime_stt.engine import PRIORITY_FINAL, PRIORITY_PARTIAL, PRIORITY_SPECULATIVE, Engine, Job
from realtime_stt.features import MelFrames, window_grid
from realtime_stt.frontend import AudioBuffer, Heard
from realtime_stt.policy import LanguageGuess, LocalAgreement, repeated_head, repetition_start, without_rereading
from realtime_stt.settings import SAMPLE_RATE, Settings
from realtime_stt.vad import VAD_FRAME, SpeechActivity, VadState
from realtime_stt.words import Word, join_words, shift


class OptionsError(ValueError):
    """A choice of the speaker's that this model or this moment cannot serve; the message says why."""


class UtteranceTooLong(Exception):
    """The utterance passed MAX_UTTERANCE_SECONDS."""


def language_choice(engine: Engine, given: str | None) -> str | None:
    """A language code the model knows, or None to detect it ('auto', empty or None); OptionsError
    for any other (every adapter refuses in the same words)."""
    language = (given or "").strip().lower()
    if language in ("", "auto"):
        return None if engine.multilingual else "en"
    if language not in engine.languages:
        known = ", ".join(engine.languages)
        shown = repr(language) if len(language) <= 20 else repr(language[:17] + "...")
        raise OptionsError(f"unsupported language {shown}; this model knows: {known}, or auto")
    return language


def check_can_translate(engine: Engine, model_id: str) -> None:
    """OptionsError, saying why, where the loaded model cannot translate."""
    if not engine.can_translate:
        raise OptionsError(
            f"model {model_id!r} cannot translate: "
            + ("it is English-only" if not engine.multilingual else "it was not trained for translation")
            + "; use task 'transcribe' or a model such as large-v3"
        )


@dataclass(frozen=True)
class StreamOptions:
    """What the speaker chose for their utterances."""

    language: str | None = None  # None: detect it
    task: str = "transcribe"
    beam_size: int = 1


@dataclass(frozen=True)
class Partial:
    committed: str  # only ever grows within an utterance
    tentative: str  # the rest of the latest decode, worth showing
    language: str | None  # None until the language is settled (and then nothing is shown)
    audio_arrived: float = 0.0  # time.monotonic() when the newest audio it covers arrived

    @property
    def text(self) -> str:
        return " ".join(t for t in (self.committed, self.tentative) if t)


@dataclass(frozen=True)
class Final:
    text: str
    language: str | None
    duration_s: float


@dataclass(frozen=True)
class Speculation:
    """A whole-utterance final decoded once the speech stopped, for a stop that comes before more speech."""

    end: int  # samples it decoded; it stands while nothing after them may be speech
    job: Job


@dataclass
class Utterance:
    policy: LocalAgreement
    audio: AudioBuffer = field(default_factory=AudioBuffer)
    speech: SpeechActivity = field(default_factory=SpeechActivity)
    decoded_until: int = 0  # samples covered by the last partial decode
    arrived: float = 0.0  # time.monotonic() when the newest audio arrived
    settled: bool = False  # the last partial decode came after the speaker had stopped
    speculation: Speculation | None = None
    language: LanguageGuess = field(default_factory=LanguageGuess)
    mel: MelFrames | None = None  # the log-mel frames, kept as the audio is scored (features.py)

    @property
    def seconds(self) -> float:
        return self.audio.end / SAMPLE_RATE

    @property
    def awaits_first_words(self) -> bool:
        """The speaker has begun and nothing is shown yet, in a language already settled (with
        detection, words wait for enough speech, which no sooner decode brings)."""
        policy = self.policy
        return self.speech.heard() and self.language.settled and not policy.committed and not policy.shown_tentative()

    @property
    def window_start(self) -> int:
        return int(self.policy.window_start * SAMPLE_RATE)


class Pipeline:
    """One speaker's stream of utterances on the shared engine.

    ``run`` holds the partial-maker and the speech watcher under one TaskGroup until cancelled;
    ``feed`` takes audio, ``finish`` ends the utterance with its final, and the socket (or whatever
    fed it) is then ready for the next one.
    """

    MIN_PARTIAL_SECONDS = 0.3
    # The speaker has paused after this much silence: partials slow down, and speech after it wakes them.
    PAUSE_SECONDS = 0.2
    # Silence this long (two VAD frames) after speech, with the model mostly idle, starts the
    # final's decode before the stop: a push-to-talk user lets go 0.2-0.5 s after the last word,
    # and the VAD hears the stop of speech about 0.15 s after it (100 ms chunks), so waiting for
    # PAUSE_SECONDS left the decode to start after the key came up (README, "Finals").
    SPECULATE_AFTER_SILENCE = 0.064
    # The final decodes the whole utterance again (FINAL_MODE=full) as the offline decode does: the
    # committed words plus the tail lose words LocalAgreement dropped early. FINAL_MODE=auto does so
    # up to one Whisper window and keeps the tail beyond, bounding the final's cost; tail always
    # does. No silence is padded after the last sample: it raised the final WER (docs/design.md).
    FULL_FINAL_SECONDS = 30.0
    # Greedy Whisper sometimes ends a window's decode early and seeks past the speech after it.
    # Speech heard this long after the final's last word is decoded once more and added; Whisper's
    # segment ends can be a second early, and a shorter gap would decode the last words again.
    SKIPPED_SPEECH_SECONDS = 3.0
    # Without timestamps, greedy Whisper ends its output at a pause of half a second or more. Such a
    # final's words are aligned to the audio; where the partials committed words ending more than
    # this after its last one, and the VAD heard speech this long after it, that audio is decoded
    # again, so what follows a pause is not lost. Tentative words are not enough evidence: a tail
    # decode after them can add words of its own.
    SKIPPED_SPEECH_HEARD_SECONDS = 1.0
    # Alone, a session's audio is scored as each message comes, so that its pauses and speculative
    # final are noticed at once. While others stream (no speculation then), it is scored once this
    # much waits, or when a partial or the final reads it: under load most messages then cost no hop
    # to the frontend's rounds, and speech after a pause is noticed up to 0.2 s later. Turns ended
    # by the VAD (OpenAI's server VAD: ``on_speech``) are always scored as the audio comes.
    SCORE_SHARED_SECONDS = 0.3

    def __init__(self, engine: Engine, settings: Settings, publish: Callable[[Partial], Awaitable[None]]) -> None:
        self.engine = engine
        self.settings = settings
        self.options = StreamOptions(language=None if engine.multilingual else "en")
        self.utterance = self._new_utterance()
        self._publish = publish
        # Silero's frame scores as they come (first frame, scores), for turns ended on speech (OpenAI's server VAD).
        self.on_speech: Callable[[int, np.ndarray], None] | None = None
        self._odd_byte = b""
        self._finalizing = False
        self._closed = False
        self._finished = False  # a final went out, and no audio came since
        self._audio_arrived = asyncio.Event()
        self._audio_to_score = asyncio.Event()
        self._speech_began = asyncio.Event()  # the speaker spoke after a pause (or for the first time)
        self._scoring = asyncio.Lock()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._make_partials())
                tasks.create_task(self._watch_speech())
        finally:
            self.end()
            self.engine.forget(self)

    def end(self) -> None:
        """The session is closing: its queued work goes stale, and it counts as a speaker no more,
        before the client hears the close (a client that reconnects at once finds its slot free)."""
        self._closed = True

    def feed(self, data: bytes) -> None:
        """Take int16 little-endian PCM; a chunk may end in the middle of a sample."""
        data = self._odd_byte + data
        usable = len(data) - len(data) % 2
        self._odd_byte = data[usable:]
        samples = np.frombuffer(data[:usable], dtype="<i2")
        if (self.utterance.audio.end + samples.size) / SAMPLE_RATE > self.settings.max_utterance_seconds:
            raise UtteranceTooLong
        self.utterance.audio.append(samples)
        self.utterance.arrived = time.monotonic()
        self._finished = False
        self.engine.metrics.audio_seconds.inc(samples.size / SAMPLE_RATE)
        self._audio_arrived.set()
        due = self.utterance.audio.end - self.utterance.speech.scored_until >= self.SCORE_SHARED_SECONDS * SAMPLE_RATE
        if due or self.on_speech is not None or not self.engine.others_streaming(self):
            self._audio_to_score.set()

    def discard(self) -> None:
        """Drop the utterance under way undecoded (cleared, or no speech in it); work on it goes stale."""
        self.utterance, self._odd_byte, self._finished = self._new_utterance(), b"", True

    @property
    def active(self) -> bool:
        """Whether this speaker counts against the capacity: from the start until a final, and again
        from the next utterance's audio. A push-to-talk client that opens a socket for each
        utterance is thus counted once, not twice while its last socket is closing; nor is a session
        the server is closing (``end``)."""
        return not self._finished and not self._closed

    @property
    def has_audio(self) -> bool:
        """Whether an utterance is under way: audio came since the last final."""
        return self.utterance.audio.end > 0

    def configure(self, changes: Mapping[str, Any]) -> None:
        """Take the speaker's choices (language, task, beam_size) for the next utterance; the ones
        not named keep their value. OptionsError says why one cannot be taken."""
        if self.has_audio:
            raise OptionsError("config must come before the audio of an utterance; it was ignored")
        changes = dict(changes)
        if "language" in changes:
            changes["language"] = language_choice(self.engine, changes["language"])
        if changes.get("task") == "translate":
            check_can_translate(self.engine, self.settings.model_id)
        self.options = replace(self.options, **changes)
        self.utterance = self._new_utterance()  # no audio yet: it starts under the new options

    def _new_utterance(self) -> Utterance:
        language = self.options.language
        return Utterance(LocalAgreement(self.settings.window_seconds), language=LanguageGuess(language, language is not None),
                         mel=MelFrames(self.engine.frontend.filters))

    def _window_options(self, utterance: Utterance, seconds: float, *, final: bool) -> DecodeOptions:
        return DecodeOptions(
            language=utterance.language.language if utterance.language.settled else None, task=self.options.task,
            beam_size=self.options.beam_size, prompt=utterance.policy.prompt(),
            temperatures=(0.0, 0.2, 0.4, 0.6) if final else (0.0,), max_new_tokens=token_budget(seconds),
            encoder=None if final else PARTIAL_ENCODER,
        )

    async def _make_partials(self) -> None:
        loop = asyncio.get_running_loop()
        last_tick = 0.0
        while True:
            # Cadence, not polling: this waits only while new audio is pending.
            await self._audio_arrived.wait()
            # Every session ticks on one clock grid, so the partials that are due meet in the
            # engine's queue at the same moment and run as one batch. Under load a decode outlasts
            # the interval: the next one starts as soon as it returns, with the sessions that shared
            # its batch, so cadence stretches to the batch's time instead of work queueing.
            self._speech_began.clear()
            try:
                # Speech that begins during a pause's slow wait moves the partial to the next fast
                # grid point: the first words wait for no slow tick.
                async with asyncio.timeout_at(self._next_tick(loop.time(), last_tick)):
                    await self._speech_began.wait()
                await asyncio.sleep(max(0.0, self._next_tick(loop.time(), last_tick) - loop.time()))
            except TimeoutError:
                pass
            self._audio_arrived.clear()
            last_tick = loop.time()
            await self._partial()

    def _next_tick(self, now: float, last_tick: float) -> float:
        """The first point of the grid after ``last_tick``, now if that is already past: a session that
        kept the phase of a late start would meet the others' batches no more."""
        utterance = self.utterance
        interval = self.engine.partial_interval(speaking=not self._paused(utterance), first_words=utterance.awaits_first_words)
        earliest = (math.floor(last_tick / interval + 1e-9) + 1) * interval
        return max(earliest, math.ceil(now / interval) * interval) if now <= earliest else now

    async def _partial(self) -> None:
        utterance = self.utterance
        audio_end, arrived = utterance.audio.end, utterance.arrived
        window_start = window_grid(utterance.window_start)  # where the kept log-mel frames lie
        if self._finalizing or audio_end <= utterance.decoded_until:
            return
        if (audio_end - window_start) / SAMPLE_RATE < self.MIN_PARTIAL_SECONDS:
            return
        await self._score_speech(utterance)
        if self._finalizing or self.utterance is not utterance:
            return  # the stop came meanwhile: a partial now would follow its final
        quiet = utterance.speech.silent_since(utterance.decoded_until)
        if quiet and utterance.settled:
            # Nothing said since a decode that already came after the speaker stopped: the text
            # cannot change, so the partial is sent again without a decode.
            utterance.decoded_until = audio_end
            self.engine.metrics.decodes_skipped.inc()
            await self._publish(self._partial_of(utterance, arrived))
            return
        audio = utterance.audio.since(window_start)[: audio_end - window_start]
        self.engine.metrics.partial_window.observe(audio.size / SAMPLE_RATE)
        heard = Heard(window_start, utterance.speech.scores(), utterance.mel.snapshot())  # its VAD and features
        transcript = await self.engine.transcribe(
            audio,
            self._window_options(utterance, audio.size / SAMPLE_RATE, final=False),
            priority=PRIORITY_PARTIAL,
            is_stale=lambda: self._closed or self._finalizing or self.utterance is not utterance,
            requester=self,
            heard=heard,
        )
        if transcript is None or self._finalizing or self.utterance is not utterance:
            return  # overtaken by the final: a partial after it would be stale
        utterance.decoded_until = audio_end
        utterance.settled = quiet
        guess = utterance.language
        window_full = (audio_end - window_start) / SAMPLE_RATE >= self.settings.window_seconds
        guess.observe(transcript.language, transcript.language_probability, transcript.speech_seconds, window_full=window_full)
        policy = utterance.policy
        # Words are committed only in the settled language, so a guess that is then revised leaves
        # nothing behind; a hypothesis under the guess that is then settled on can agree at once.
        settled = guess.settled and transcript.language == guess.language
        # On a machine more than half full, the window slides at half its span: the next partials
        # read less committed audio again, and their encode and decode cost less.
        span = self.settings.window_seconds / 2 if self.engine.loaded() else None
        policy.update(shift(transcript.words, window_start / SAMPLE_RATE), audio_end / SAMPLE_RATE,
                      commit=settled or not transcript.words, span=span)
        if not self._final_decodes_whole(utterance):
            utterance.audio.trim(utterance.window_start)
        utterance.mel.trim(window_grid(utterance.window_start))  # no later window reads frames before it
        await self._publish(self._partial_of(utterance, arrived))

    @staticmethod
    def _partial_of(utterance: Utterance, arrived: float) -> Partial:
        """The policy's text as it stands; it changes only with a decode, so a skipped one resends it.
        Before the language is settled nothing is shown: the words may be of a wrong guess."""
        policy, guess = utterance.policy, utterance.language
        shown = policy.shown_tentative() if guess.settled else []
        return Partial(join_words(policy.committed), join_words(shown), guess.language if guess.settled else None, arrived)

    # -- speech activity and the speculative final -------------------------------------------

    async def _watch_speech(self) -> None:
        while True:
            await self._audio_to_score.wait()
            self._audio_to_score.clear()
            utterance = self.utterance
            paused = self._paused(utterance)
            await self._score_speech(utterance)
            if paused and not self._paused(utterance):
                self._speech_began.set()
            self._maybe_speculate(utterance)

    async def _score_speech(self, utterance: Utterance) -> None:
        """Score the audio that came since the last call and keep its log-mel frames (frontend.py)."""
        async with self._scoring:
            speech, audio, mel = utterance.speech, utterance.audio, utterance.mel
            if speech.scored_until < audio.start:
                # Trimmed before it was scored (only a session whose final keeps the tail trims):
                # count it as speech, the safe side, and score on from where the audio is kept.
                speech.add(np.ones(-(-audio.start // VAD_FRAME) - speech.frames, dtype=np.float32))
                speech.vad_state = VadState()
            mel.skip_to(audio.start)
            if audio.end // VAD_FRAME <= speech.frames and mel.ready(audio.end) <= mel.count:
                return
            start, first = min(speech.scored_until, mel.needs_from()), speech.frames
            await self.engine.frontend.listen(speech, mel, audio.since(start), start)
            if self.on_speech is not None and utterance is self.utterance and speech.frames > first:
                self.on_speech(first, speech.scores()[first:])

    def _paused(self, utterance: Utterance) -> bool:
        """The speaker has been silent for PAUSE_SECONDS, as far as the audio is scored: partials
        slow down, and speech after it wakes them."""
        return utterance.speech.trailing_silence() >= self.PAUSE_SECONDS

    def _maybe_speculate(self, utterance: Utterance) -> None:
        speech = utterance.speech
        if (
            self._finalizing
            or utterance is not self.utterance
            or not self._final_decodes_whole(utterance)
            or utterance.seconds > self.FULL_FINAL_SECONDS
            or not speech.heard()
            or speech.trailing_quiet() < self.SPECULATE_AFTER_SILENCE
        ):
            return
        earlier = utterance.speculation
        if earlier is not None and speech.quiet_since(earlier.end):
            return  # this pause already has one
        if not self.engine.has_time_for(self):
            return
        end = speech.scored_until

        def voided() -> bool:
            return self._closed or self.utterance is not utterance or not speech.quiet_since(end)

        job = self.engine.submit(
            utterance.audio.since(0)[:end],
            self._final_options(),
            priority=PRIORITY_SPECULATIVE,
            requester=self,
            # Not yet taken when the stop comes (self._finalizing), the final decodes afresh instead;
            # once running, it stops between its steps when speech comes after it.
            is_stale=lambda: self._finalizing or voided(),
            voided=voided,
            heard=self._heard(utterance),
        )
        utterance.speculation = Speculation(end, job)

    async def _speculated(self, utterance: Utterance) -> Transcript | None:
        """The speculative final, if it is running or done and nothing was said after it."""
        speculation = utterance.speculation
        if speculation is None or not speculation.job.started:
            return None
        await self._score_speech(utterance)
        # Less than a frame (32 ms) may be left unscored at the end: too short to hold a word.
        if not utterance.speech.quiet_since(speculation.end):
            return None
        transcript = await speculation.job.future
        if transcript is not None:
            self.engine.metrics.speculative_finals.inc()
        return transcript

    async def finish(self) -> Final:
        """Decode what the speaker said; the pipeline is then ready for the next utterance."""
        self._finalizing = True
        utterance = self.utterance
        try:
            text, language = await self._final_text(utterance)
            final = Final(text, language, round(utterance.seconds, 3))
            self._finished = True
            return final
        finally:
            self.utterance = self._new_utterance()
            self._odd_byte = b""
            self._finalizing = False

    def _final_options(self) -> DecodeOptions:
        language, task, beam_size = self.options.language, self.options.task, self.options.beam_size
        return DecodeOptions(language, task, beam_size, temperatures=(0.0, 0.2, 0.4, 0.6), offline=True, encoder=FINAL_ENCODER)

    @staticmethod
    def _heard(utterance: Utterance) -> Heard:
        """The whole utterance's VAD scores as the stream computed them, for its final (which
        computes its features afresh: decoder.decode_window)."""
        return Heard(0, utterance.speech.scores(), None)

    def _final_decodes_whole(self, utterance: Utterance) -> bool:
        mode = self.settings.final_mode
        return mode == "full" or (mode == "auto" and utterance.seconds <= self.FULL_FINAL_SECONDS)

    async def _final_text(self, utterance: Utterance) -> tuple[str, str | None]:
        if utterance.audio.end == 0:
            return "", self.options.language
        if self._final_decodes_whole(utterance):
            transcript = await self._speculated(utterance)
            if transcript is None:
                await self._score_speech(utterance)  # the whole utterance: its VAD is the final's
                transcript = await self.engine.transcribe(
                    utterance.audio.since(0), self._final_options(), priority=PRIORITY_FINAL, heard=self._heard(utterance)
                )
            assert transcript is not None  # finals are never stale
            words = [*transcript.words, *await self._skipped_speech(utterance, transcript)]
            loop = repetition_start(words)
            return join_words(words if loop is None else words[:loop]), transcript.language
        # Tail: the committed words stand; only the window after them is decoded again.
        window_start = utterance.window_start
        audio = utterance.audio.since(window_start)
        transcript = await self.engine.transcribe(
            audio, self._window_options(utterance, audio.size / SAMPLE_RATE, final=True), priority=PRIORITY_FINAL
        )
        assert transcript is not None
        words = utterance.policy.final(shift(transcript.words, window_start / SAMPLE_RATE))
        return join_words(words), transcript.language

    async def _skipped_speech(self, utterance: Utterance, transcript: Transcript) -> list[Word]:
        """The words of speech that the final's decode skipped after its last word, if any."""
        words = transcript.words
        if not words:
            return []  # the same audio would decode the same way
        end, gap = words[-1].end, self.SKIPPED_SPEECH_SECONDS
        committed = utterance.policy.committed
        if transcript.aligned and committed and committed[-1].end - end > self.SKIPPED_SPEECH_HEARD_SECONDS:
            gap = self.SKIPPED_SPEECH_HEARD_SECONDS
        await self._score_speech(utterance)
        if utterance.speech.silent_since(int((end + gap) * SAMPLE_RATE)):
            return []
        self.engine.metrics.skipped_speech_decodes.inc()
        options = replace(self._final_options(), language=transcript.language, prompt=join_words(words)[-200:])
        tail = await self.engine.transcribe(utterance.audio.since(int(end * SAMPLE_RATE)), options, priority=PRIORITY_FINAL)
        assert tail is not None
        added = shift(tail.words, end)
        return without_rereading(words, added[repeated_head(words, added) :])
