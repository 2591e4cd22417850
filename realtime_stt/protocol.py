"""The seed WebSocket protocol, a thin adapter over the utterance pipeline, and the socket session
every WebSocket protocol shares.

Client to server: an optional JSON config, binary int16 PCM frames, ``{"type": "stop"}``. Server to
client: ``partial`` and ``final`` messages, ``error`` for a message it cannot use, and close codes
for what ends a session. Transport failures become ClientGone; a close the server decided on
becomes SessionClosed, after the client was told why. Either ends the session with a reason, the
label it is counted under in ``stt_sessions_ended_total``. ``SocketSession`` holds what does not
depend on the messages (the outbox and its sender, the receiver with its idle limit, the close, the
drain for a restart); ``openai_realtime`` speaks OpenAI's Realtime events over the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from realtime_stt.engine import Engine
from realtime_stt.pipeline import Final, OptionsError, Partial, Pipeline, UtteranceTooLong
from realtime_stt.settings import Settings

logger = logging.getLogger(__name__)

CLOSE_NORMAL = 1000  # an idle socket
CLOSE_POLICY = 1008  # wrong or missing API key, a page from an origin not allowed, a client that reads nothing
CLOSE_TOO_BIG = 1009  # utterance longer than MAX_UTTERANCE_SECONDS
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012  # the server is restarting: every final was sent first
CLOSE_TRY_AGAIN = 1013  # server busy, still loading, or draining for a restart
MOST_QUEUED = 64  # messages other than partials waiting for one client; past it the client is not reading
CLOSE_SECONDS = 2.0  # how long a close may wait on a client that reads nothing


class Ending(Exception):
    """The session ends; ``reason`` is how (client, idle, too_long, slow_reader, restart)."""

    reason = "client"


class ClientGone(Ending):
    """The client closed the socket or the transport broke."""


class SessionClosed(Ending):
    """The server closed the socket (already told the client why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["config"] = "config"
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    beam_size: int = Field(default=1, ge=1, le=10)


class StopMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["stop"]


@dataclass(frozen=True)
class Outgoing:
    text: str
    kind: str  # partial, final, error
    since: float  # time.monotonic() the latency it closes started: newest audio, or the stop


class Outbox:
    """What waits to go to one client: the latest partial only, every other message in order.

    A client that reads slowly gets the newest partial instead of a backlog; its final is kept.
    The queue is bounded: a client that lets more than ``most`` messages pile up is not reading.
    """

    def __init__(self, most: int = MOST_QUEUED) -> None:
        self._partial: Outgoing | None = None
        self._queue: deque[Outgoing] = deque()
        self._most = most
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()  # nothing waiting and nothing being sent
        self._idle.set()

    def put_partial(self, message: Outgoing) -> bool:
        """Queue a partial in place of any unsent one; True if it replaced one."""
        replaced = self._partial is not None
        self._partial = message
        self._wake()
        return replaced

    def put(self, message: Outgoing) -> bool:
        """Queue a final or an error; False if the client let too many pile up."""
        if message.kind == "final":
            self._partial = None  # its utterance is over: a partial of it would come after its final
        if len(self._queue) >= self._most:
            return False
        self._queue.append(message)
        self._wake()
        return True

    async def take(self) -> Outgoing:
        while not (self._queue or self._partial):
            self._ready.clear()
            await self._ready.wait()
        if self._queue:
            return self._queue.popleft()
        message, self._partial = self._partial, None
        return message

    def sent(self) -> None:
        if not (self._queue or self._partial):
            self._idle.set()

    async def flushed(self) -> None:
        await self._idle.wait()

    def _wake(self) -> None:
        self._idle.clear()
        self._ready.set()


class SocketSession:
    """One WebSocket of any protocol: a receiver, a sender, the pipeline and a drain watcher under
    one TaskGroup, so nothing outlives it. A protocol says what its messages mean (``_on_text``,
    ``_on_audio``, ``_publish_partial``) and what a restart finalizes (``_finish_before_restart``)."""

    # What a client whose utterance ran past MAX_UTTERANCE_SECONDS should do instead.
    TOO_LONG_ADVICE = "send stop sooner"

    def __init__(self, ws: WebSocket, engine: Engine, settings: Settings, draining: asyncio.Event) -> None:
        self.ws = ws
        self.settings = settings
        self.metrics = engine.metrics
        self.pipeline = Pipeline(engine, settings, publish=self._publish_partial)
        self.outbox = Outbox()
        self._draining = draining
        self._finishing = asyncio.Lock()  # a stop and a drain both end the utterance: one at a time

    async def run(self) -> str:
        """Serve the socket until it ends; how it ended."""
        ending = "client"
        try:
            async with asyncio.TaskGroup() as tasks:
                for work in self._work():
                    tasks.create_task(work)
        except* Ending as group:
            ending = _first(group).reason
        return ending

    def _work(self) -> list[Coroutine[Any, Any, None]]:
        """The session's tasks, run together until one ends it."""
        return [self._receive(), self._send_all(), self.pipeline.run(), self._drain_when_asked()]

    # -- what a protocol says -----------------------------------------------------------------

    async def _publish_partial(self, partial: Partial) -> None:
        raise NotImplementedError

    async def _on_audio(self, data: bytes) -> None:
        raise NotImplementedError

    async def _on_text(self, text: str) -> None:
        raise NotImplementedError

    async def _finish_before_restart(self) -> None:
        """Finalize the utterance under way from the audio so far (``_finishing`` is held)."""
        raise NotImplementedError

    # -- sending ------------------------------------------------------------------------------

    async def _queue(self, message: dict[str, Any], since: float = 0.0, kind: str | None = None) -> None:
        """Queue a message in order; ``kind`` (partial, final, or the message's type) is what its
        latency is counted as."""
        if not self.outbox.put(Outgoing(_dumps(message), kind or message["type"], since)):
            await self._slow_reader(f"{MOST_QUEUED} messages unread")

    async def _send_all(self) -> None:
        timeout = self.settings.send_timeout_seconds
        while True:
            message = await self.outbox.take()
            try:
                async with asyncio.timeout(timeout):
                    await self.ws.send_text(message.text)
            except TimeoutError:
                await self._slow_reader(f"no message read for {timeout:g} s")
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                raise ClientGone from exc
            self.outbox.sent()
            if message.kind == "partial":
                self.metrics.partial_latency.observe(time.monotonic() - message.since)
            elif message.kind == "final":
                self.metrics.final_latency.observe(time.monotonic() - message.since)

    async def _slow_reader(self, what: str) -> None:
        reason = f"client is not reading: {what} (SEND_TIMEOUT_SECONDS)"
        await self._close(CLOSE_POLICY, reason, "slow_reader", flush=False)

    async def _close(self, code: int, reason: str, ending: str, *, flush: bool = True) -> None:
        """Send what is waiting (a client that reads gets every answer before the close), then close."""
        logger.info("closing session: %s (%d)", reason, code)
        self.pipeline.end()
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                if flush:
                    await self.outbox.flushed()
                await self.ws.close(code=code, reason=close_reason(reason))
        except (TimeoutError, RuntimeError, OSError):
            pass  # the client went first, or reads nothing: nothing left to tell it
        raise SessionClosed(ending)

    # -- receiving ----------------------------------------------------------------------------

    async def _receive(self) -> None:
        idle = self.settings.idle_timeout_seconds
        while True:
            try:
                async with asyncio.timeout(idle or None):
                    message = await self.ws.receive()
            except TimeoutError:
                reason = f"idle: nothing received for {idle:g} s (IDLE_TIMEOUT_SECONDS); reconnect to speak"
                await self._close(CLOSE_NORMAL, reason, "idle")
            except (RuntimeError, OSError) as exc:
                raise ClientGone from exc
            if message["type"] == "websocket.disconnect":
                raise ClientGone
            if self._draining.is_set():
                continue  # the drain finalizes what came before it; the socket closes next
            if message.get("bytes") is not None:
                await self._on_audio(message["bytes"])
            elif message.get("text") is not None:
                await self._on_text(message["text"])

    async def _feed(self, data: bytes) -> None:
        """Hand int16 16 kHz PCM to the pipeline; an utterance past its limit closes the socket."""
        try:
            self.pipeline.feed(data)
        except UtteranceTooLong:
            await self._too_long()

    async def _too_long(self) -> None:
        limit = self.settings.max_utterance_seconds
        reason = f"utterance longer than MAX_UTTERANCE_SECONDS={limit:g} s; {self.TOO_LONG_ADVICE}"
        await self._close(CLOSE_TOO_BIG, reason, "too_long")

    # -- draining for a restart ---------------------------------------------------------------

    async def _drain_when_asked(self) -> None:
        """On a restart: the utterance under way is finalized from the audio so far and its final
        sent, then the socket closes with 1012; an idle socket closes at once."""
        await self._draining.wait()
        async with self._finishing:
            await self._finish_before_restart()
        await self.outbox.flushed()
        await self._close(CLOSE_RESTART, "server restarting: reconnect in a moment", "restart")


class WebSocketSession(SocketSession):
    """The seed protocol's session: JSON config and stop, binary PCM, partial and final messages."""

    async def _publish_partial(self, partial: Partial) -> None:
        message = {
            "type": "partial",
            "text": partial.text,
            "committed": partial.committed,
            "tentative": partial.tentative,
            "language": partial.language,
        }
        if self.outbox.put_partial(Outgoing(_dumps(message), "partial", partial.audio_arrived)):
            self.metrics.partials_replaced.inc()

    async def _error(self, message: str) -> None:
        await self._queue({"type": "error", "message": message})

    async def _queue_final(self, final: Final, stop_received: float) -> None:
        message = {"type": "final", "text": final.text, "language": final.language, "duration_s": final.duration_s}
        await self._queue(message, stop_received)

    async def _on_audio(self, data: bytes) -> None:
        await self._feed(data)

    async def _on_text(self, text: str) -> None:
        try:
            message = json_object(text, "a control message")
        except BadMessage as exc:
            await self._error(str(exc))
            return
        kind = message.get("type", "config")
        try:
            if kind == "config":
                config = ConfigMessage.model_validate(message)
                self.pipeline.configure({name: getattr(config, name) for name in config.model_fields_set - {"type"}})
            elif kind == "stop":
                StopMessage.model_validate(message)
                await self._finish()
            else:
                await self._error(f"unknown message type {short(kind)}; expected 'config' or 'stop'")
        except ValidationError as exc:
            await self._error(describe(exc))
        except OptionsError as exc:
            await self._error(str(exc))

    async def _finish(self) -> None:
        async with self._finishing:
            await self._final_now()

    async def _final_now(self) -> None:
        stop_received = time.monotonic()
        await self._queue_final(await self.pipeline.finish(), stop_received)

    async def _finish_before_restart(self) -> None:
        if self.pipeline.has_audio:
            await self._final_now()


class BadMessage(ValueError):
    """A client's text message that is not a JSON object; the message says why."""


def json_object(text: str, what: str) -> dict[str, Any]:
    """A client's text message as a JSON object, or BadMessage saying why it is not one."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadMessage(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise BadMessage("invalid JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise BadMessage(f"{what} must be a JSON object")
    return message


def close_reason(reason: str) -> str:
    """A close frame's reason holds at most 123 bytes of UTF-8."""
    encoded = reason.encode()
    return reason if len(encoded) <= 123 else encoded[:120].decode(errors="ignore") + "..."


def short(value: Any, most: int = 40) -> str:
    """repr() of a client's value, cut short: an error message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False)


def _first(group: BaseExceptionGroup) -> Ending:
    """The first Ending in a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        return exc
    raise AssertionError("empty exception group")


def describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problems.append(f"{where}: {error['msg']}")
    return "invalid message: " + "; ".join(problems)
