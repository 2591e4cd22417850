"""Home Assistant's Assist over the Wyoming protocol: a thin adapter over the utterance pipeline.

Wyoming runs over TCP: a JSON header line per event ``{"type", "data"?, "data_length"?,
"payload_length"?}``, then that many bytes of JSON merged into ``data`` and of payload. In:
``describe`` (answered with ``info``), ``transcribe`` {``language``?, ``name``?}, ``audio-start``
{``rate``, ``width``, ``channels``}, ``audio-chunk``s, ``audio-stop``. Out, per utterance:
``transcript-start`` once the language is settled, a ``transcript-chunk`` with each newly committed
stretch of words while the audio still arrives, then ``transcript`` {``text``, ``language``} with
the final and ``transcript-stop``. Utterances follow one another on one connection.

The header is read here, not by the ``wyoming`` package (whose reader takes any length): every
buffer is bounded, and bad input gets an ``error`` event and a close. Outgoing events are built
with the package's own classes. A connection counts as a session (MAX_SESSIONS, the drain) from
its first ``transcribe`` or audio on: a ``describe`` is answered even when the server is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Protocol

import numpy as np
import soxr
from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Info
from wyoming.ping import Pong

from realtime_stt.engine import Engine
from realtime_stt.metrics import Metrics
from realtime_stt.pipeline import OptionsError, Partial, Pipeline, UtteranceTooLong, language_choice
from realtime_stt.settings import SAMPLE_RATE, Settings

logger = logging.getLogger(__name__)

PROGRAM = "realtime-stt"
MAX_HEADER_BYTES = 64 * 1024  # one header line; the StreamReader's buffer limit
MAX_DATA_BYTES = 64 * 1024  # the JSON after a header (data_length)
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # an audio chunk (HA's: 1024 samples); 2 min of 16 kHz int16; larger refused unread
MOST_QUEUED = 64  # events waiting for one client, besides merged chunks; past it the client is not reading
CLOSE_SECONDS = 2.0  # how long a close may wait on a client that reads nothing
RATES = (1_000, 384_000)  # sample rates taken, in Hz
WIDTHS = (1, 2, 3, 4)  # bytes a sample: unsigned 8-bit, then signed little-endian 16, 24 and 32-bit
MOST_CHANNELS = 32


class Host(Protocol):
    """What the app lends the server (app.Service): the model, the admission rules and the drain."""

    settings: Settings
    metrics: Metrics
    engine: Engine | None
    draining: asyncio.Event

    def refusal(self) -> tuple[str, str] | None: ...
    def serving(self, session: Any) -> contextlib.AbstractContextManager[Any]: ...


class BadInput(Exception):
    """An event this server cannot use: the client gets an ``error`` with ``code`` and the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Ending(Exception):
    """The connection ends; ``reason`` is how (client, idle, too_long, slow_reader, restart, bad_input)."""

    def __init__(self, reason: str = "client") -> None:
        super().__init__(reason)
        self.reason = reason


# -- audio: any PCM to 16 kHz mono int16 ---------------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    """A stream's PCM: samples a second, bytes a sample, interleaved channels."""

    rate: int
    width: int
    channels: int

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> AudioFormat:
        """The format an ``audio-start`` or ``audio-chunk`` names; BadInput where it is missing or odd."""
        values = [data.get(name) for name in ("rate", "width", "channels")]
        if not all(type(value) is int for value in values):
            raise BadInput("bad_audio", "audio events need integer 'rate', 'width' and 'channels'")
        audio = cls(*values)
        if not RATES[0] <= audio.rate <= RATES[1]:
            raise BadInput("bad_audio", f"rate {audio.rate} Hz is out of range; use {RATES[0]} to {RATES[1]}")
        if audio.width not in WIDTHS:
            raise BadInput("bad_audio", f"width {audio.width} is not one of {', '.join(map(str, WIDTHS))} bytes")
        if not 1 <= audio.channels <= MOST_CHANNELS:
            raise BadInput("bad_audio", f"{audio.channels} channels; use 1 to {MOST_CHANNELS}")
        return audio


PIPELINE_FORMAT = AudioFormat(SAMPLE_RATE, 2, 1)


def samples_of(data: bytes, width: int) -> np.ndarray:
    """Whole little-endian PCM samples of ``width`` bytes as float32 in [-1, 1)."""
    if width == 1:  # 8-bit PCM is unsigned, as in WAV
        return (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # no NumPy type: put each sample in the top three bytes of an int32
        padded = np.zeros((len(data) // 3, 4), np.uint8)
        padded[:, 1:] = np.frombuffer(data, np.uint8).reshape(-1, 3)
        return (padded.view("<i4")[:, 0] / 2.0**31).astype(np.float32)
    kind = {2: "<i2", 4: "<i4"}[width]
    return (np.frombuffer(data, kind) / float(2 ** (8 * width - 1))).astype(np.float32)


class Converter:
    """One stream's audio, chunk by chunk, to what the pipeline takes: channels averaged, the rate
    changed by soxr's streaming resampler (which keeps its filter state across chunks, so chunk
    edges leave no clicks), int16. A chunk may end inside a frame: the rest waits for the next."""

    def __init__(self, audio: AudioFormat) -> None:
        self.format = audio
        self._rest = b""
        self._resampler = soxr.ResampleStream(audio.rate, SAMPLE_RATE, 1) if audio.rate != SAMPLE_RATE else None

    def convert(self, data: bytes, *, last: bool = False) -> bytes:
        """int16 16 kHz mono PCM of ``data``; ``last`` flushes what the resampler still holds."""
        if self.format == PIPELINE_FORMAT:
            return data  # the pipeline's own format: taken as it is (it keeps a split sample itself)
        data = self._rest + data
        frame = self.format.width * self.format.channels
        usable = len(data) - len(data) % frame
        self._rest = data[usable:]
        samples = samples_of(data[:usable], self.format.width).reshape(-1, self.format.channels).mean(axis=1)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples.astype(np.float32), last=last)
        return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


# -- reading events ------------------------------------------------------------------------------


def _length(header: Mapping[str, Any], name: str, most: int) -> int:
    value = header.get(name) or 0  # absent or null: none
    if type(value) is not int or value < 0:
        raise BadInput("bad_event", f"'{name}' must be a non-negative integer")
    if value > most:
        raise BadInput("too_big", f"'{name}' {value} is over the limit of {most} bytes")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInput("bad_event", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadInput("bad_event", f"{what} must be a JSON object")
    return value


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, None at the end of the stream; BadInput for a malformed or oversized one.
    The reader's limit (MAX_HEADER_BYTES) bounds the header line."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None  # the stream ended (a header cut short with it is nothing to answer)
    except asyncio.LimitOverrunError:
        raise BadInput("too_big", f"an event header is over the limit of {MAX_HEADER_BYTES} bytes") from None
    header = _json_object(line, "an event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadInput("bad_event", "an event header needs a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise BadInput("bad_event", "an event's 'data' must be a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    try:
        if data_length:
            data.update(_json_object(await reader.readexactly(data_length), "an event's data"))
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(kind, data, payload)


def normal_language(engine: Engine, given: Any) -> str | None:
    """A language the model knows, from a code Home Assistant may send ('en', 'en-US', 'pt_BR');
    None to detect it; OptionsError for any other."""
    if given is not None and not isinstance(given, str):
        raise OptionsError("'language' must be a string")
    code = (given or "").strip().lower().replace("_", "-")
    if code not in engine.languages and "-" in code:
        code = code.split("-", 1)[0]
    return language_choice(engine, code)


def info(settings: Settings, engine: Engine) -> Event:
    """The answer to ``describe``: one speech-to-text program with the loaded model."""
    runtime = version("faster-whisper")
    model = AsrModel(
        name=settings.model_id, attribution=Attribution("OpenAI Whisper", "https://github.com/openai/whisper"),
        installed=True, version=runtime, languages=list(engine.languages),
        description=f"Whisper {settings.model_id} on faster-whisper {runtime} ({engine.device})",
    )
    program = AsrProgram(
        name=PROGRAM, attribution=Attribution("SYSTRAN faster-whisper", "https://github.com/SYSTRAN/faster-whisper"),
        installed=True, version=runtime, description="Realtime speech-to-text: committed words stream while you speak",
        models=[model], supports_transcript_streaming=True,
    )
    return Info(asr=[program]).event()


# -- one connection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    event: Event
    kind: str  # chunk, final, other
    since: float = 0.0  # time.monotonic() the latency it closes started: newest audio, or the stop


class WyomingSession:
    """One TCP connection: a receiver, a sender, a drain watcher and (once admitted) the pipeline,
    under one TaskGroup, so nothing outlives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: Host) -> None:
        assert host.engine is not None  # the server starts after the model and closes before it goes
        self.reader, self.writer, self.host = reader, writer, host
        self.engine, self.settings = host.engine, host.settings
        self.pipeline: Pipeline | None = None  # made when the connection is admitted
        self._admission = contextlib.ExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._outbox: deque[Outgoing] = deque()
        self._ready = asyncio.Event()  # something waits to be sent
        self._idle = asyncio.Event()  # nothing waits and nothing is being sent
        self._idle.set()
        self._finishing = asyncio.Lock()  # an audio-stop and a drain both end the utterance: one at a time
        self._converter: Converter | None = None
        self._under_way = False  # an utterance began (audio-start or audio) and has no final yet
        self._started = False  # its transcript-start was queued
        self._sent = ""  # the committed text its chunks carried so far

    async def run(self) -> None:
        ending = "error"
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._receive())
                tasks.create_task(self._send_all())
                tasks.create_task(self._drain_when_asked())
        except* Ending as group:
            ending = _first(group).reason
        except* Exception:
            logger.exception("wyoming session failed")
        finally:
            if self.pipeline is not None:
                self.host.metrics.sessions_ended.labels(ending).inc()
            self._admission.close()
            await self._close_transport()

    # -- sending ----------------------------------------------------------------------------

    def _queue(self, event: Event, kind: str = "other", since: float = 0.0) -> None:
        last = self._outbox[-1] if self._outbox else None
        if kind == "chunk" and last is not None and last.kind == "chunk":
            # A client that reads late gets one chunk with all the words it missed, not a backlog.
            merged = TranscriptChunk(last.event.data["text"] + event.data["text"]).event()
            self._outbox[-1] = Outgoing(merged, "chunk", last.since)
        elif len(self._outbox) >= MOST_QUEUED:
            raise Ending("slow_reader")  # raised in whichever task queued: it ends the TaskGroup
        else:
            self._outbox.append(Outgoing(event, kind, since))
        self._idle.clear()
        self._ready.set()

    async def _send_all(self) -> None:
        timeout, metrics = self.settings.send_timeout_seconds, self.host.metrics
        while True:
            while not self._outbox:
                self._ready.clear()
                await self._ready.wait()
            message = self._outbox.popleft()
            try:
                async with asyncio.timeout(timeout):
                    await async_write_event(message.event, self.writer)
            except TimeoutError:
                logger.info("closing wyoming connection: no event read for %g s (SEND_TIMEOUT_SECONDS)", timeout)
                raise Ending("slow_reader") from None
            except (OSError, RuntimeError) as exc:  # the client went
                raise Ending("client") from exc
            if not self._outbox:
                self._idle.set()
            if message.kind == "chunk":
                metrics.partial_latency.observe(time.monotonic() - message.since)
            elif message.kind == "final":
                metrics.final_latency.observe(time.monotonic() - message.since)

    async def _close(self, code: str, message: str, ending: str) -> None:
        """Tell the client why (an ``error`` event), send what waits, then end the connection."""
        logger.info("closing wyoming connection: %s (%s)", message, code)
        if self.pipeline is not None:
            self.pipeline.end()  # a client that reconnects once it reads the error finds its slot free
        self._queue(Error(text=message, code=code).event())
        await self._flushed()
        raise Ending(ending)

    async def _flushed(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self._idle.wait()

    async def _close_transport(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()  # a client that reads nothing holds no buffer of ours
        except OSError:
            pass  # the client went first: nothing left to close

    # -- receiving --------------------------------------------------------------------------

    async def _receive(self) -> None:
        idle = self.settings.idle_timeout_seconds
        while True:
            try:
                async with asyncio.timeout(idle or None):
                    event = await read_event(self.reader)
            except TimeoutError:
                await self._close("idle", f"idle: nothing received for {idle:g} s (IDLE_TIMEOUT_SECONDS)", "idle")
            except BadInput as exc:
                await self._close(exc.code, str(exc), "bad_input")
            except OSError as exc:  # a reset connection
                raise Ending("client") from exc
            if event is None:
                await self._flushed()  # a client that half-closed after audio-stop still gets its answer
                raise Ending("client")
            if self.host.draining.is_set():
                continue  # the drain finalizes what came before it; the connection closes next
            try:
                await self._on_event(event)
            except BadInput as exc:
                await self._close(exc.code, str(exc), "bad_input")
            except OptionsError as exc:
                await self._close("bad_option", str(exc), "bad_input")
            except UtteranceTooLong:
                limit = self.settings.max_utterance_seconds
                await self._close("too_long", f"utterance longer than MAX_UTTERANCE_SECONDS={limit:g} s", "too_long")

    async def _on_event(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind == "describe":
            self._queue(info(self.settings, self.engine))
        elif kind == "ping":
            self._queue(Pong(text=data.get("text")).event())
        elif kind == "transcribe":
            name = data.get("name")
            if name is not None and name not in (self.settings.model_id, PROGRAM):
                raise BadInput("bad_option", f"unknown model {str(name)[:40]!r}; this server has {self.settings.model_id!r}")
            # Each transcribe is a request of its own: no language given means detect it.
            language = normal_language(self.engine, data.get("language"))
            if self._under_way:
                raise BadInput("bad_event", "transcribe came during an utterance; send audio-stop first")
            (await self._admitted()).configure({"language": language})
        elif kind == "audio-start":
            audio = AudioFormat.of(data)  # bad input is refused as such, before any admission
            if self._under_way:
                raise BadInput("bad_event", "audio-start came during an utterance; send audio-stop first")
            await self._admitted()
            self._converter = Converter(audio)
            self._under_way = True
        elif kind == "audio-chunk":
            audio = AudioFormat.of(data)
            pipeline = await self._admitted()
            pcm = b""  # chunks may come without an audio-start, or change format: each names its own
            if self._converter is None or self._converter.format != audio:
                pcm = b"" if self._converter is None else self._converter.convert(b"", last=True)
                self._converter = Converter(audio)
            self._under_way = True
            pipeline.feed(pcm + self._converter.convert(event.payload or b""))
        elif kind == "audio-stop":
            await self._admitted()
            async with self._finishing:
                await self._final_now()
        # Any other event is dropped, as Wyoming servers do (a client may send newer events first).

    async def _admitted(self) -> Pipeline:
        """The connection's pipeline, admitting it as a session first: past capacity (or while the
        server drains) the client gets an ``error`` with the reason and the connection closes."""
        if self.pipeline is not None:
            return self.pipeline
        if (refused := self.host.refusal()) is not None:
            self.host.metrics.refusals.labels(refused[0]).inc()
            await self._close(refused[0], refused[1], "refused")
        # The pipeline first: the app counts a session by its pipeline (Service.speakers).
        self.pipeline = Pipeline(self.engine, self.settings, publish=self._publish_partial)
        self._admission.enter_context(self.host.serving(self))
        assert self._tasks is not None
        self._tasks.create_task(self.pipeline.run())
        return self.pipeline

    # -- transcripts ------------------------------------------------------------------------

    async def _publish_partial(self, partial: Partial) -> None:
        """Partial.committed only grows within an utterance: each chunk is its new suffix. Nothing
        goes out before the language is settled (words under a wrong guess are not shown)."""
        if partial.language is None or not self._under_way:
            return
        if not self._started:
            self._queue(TranscriptStart(language=partial.language).event())
            self._started = True
        committed = partial.committed
        if len(committed) > len(self._sent) and committed.startswith(self._sent):
            self._queue(TranscriptChunk(committed[len(self._sent) :]).event(), "chunk", partial.audio_arrived)
            self._sent = committed

    async def _final_now(self) -> None:
        assert self.pipeline is not None
        stop_received = time.monotonic()
        if self._converter is not None:
            tail = self._converter.convert(b"", last=True)  # what the resampler still holds: a few ms
            with contextlib.suppress(UtteranceTooLong):
                self.pipeline.feed(tail)  # past MAX_UTTERANCE_SECONDS only these ms are left out
        final = await self.pipeline.finish()
        if not self._started:
            self._queue(TranscriptStart(language=final.language).event())
        self._queue(Transcript(text=final.text, language=final.language).event(), "final", stop_received)
        self._queue(TranscriptStop().event())
        self._converter, self._under_way, self._started, self._sent = None, False, False, ""

    async def _drain_when_asked(self) -> None:
        """On a restart: the utterance under way is finalized from the audio so far and its
        transcript sent, then the connection closes with an ``error`` saying why."""
        await self.host.draining.wait()
        async with self._finishing:
            if self._under_way:
                await self._final_now()
        await self._close("restart", "server restarting: reconnect in a moment", "restart")


def _first(group: BaseExceptionGroup) -> Ending:
    """The first Ending in a (nested) exception group (never empty)."""
    exc = group.exceptions[0]
    return _first(exc) if isinstance(exc, BaseExceptionGroup) else exc


class WyomingServer:
    """The TCP server, started in the app's lifespan once the model is loaded, closed before it goes."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @classmethod
    async def start(cls, host: Host) -> WyomingServer:
        """Listen on WYOMING_HOST:WYOMING_PORT; OSError where the address cannot be bound."""
        server, settings = cls(host), host.settings
        where = f"{settings.wyoming_host}:{settings.wyoming_port}"
        try:
            server._server = await asyncio.start_server(server._connected, settings.wyoming_host,
                                                        settings.wyoming_port, limit=MAX_HEADER_BYTES)
        except OSError as exc:  # the port taken, an address not of this machine: say which setting
            why = f"Wyoming cannot listen on {where} (WYOMING_HOST, WYOMING_PORT): {exc.strerror}"
            raise OSError(exc.errno, why) from exc
        logger.info("Wyoming (Home Assistant) on tcp://%s; it has no API key: keep it on a trusted network", where)
        return server

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)  # type: ignore[arg-type]  # a callback of start_server runs in a task
        try:
            await WyomingSession(reader, writer, self.host).run()
        finally:
            self._connections.discard(task)

    async def close(self) -> None:
        """Stop listening and end every connection (a drain has already sent their finals)."""
        if self._server is None:
            return
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
