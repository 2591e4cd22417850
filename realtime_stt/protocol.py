"""The seed WebSocket protocol, a thin adapter over the utterance pipeline.

Client to server: an optional JSON config, binary int16 PCM frames, ``{"type": "stop"}``. Server to
client: ``partial`` and ``final`` messages, ``error`` for a message it cannot use, and close codes
for what ends a session. Transport failures become ClientGone; a close the server decided on
becomes SessionClosed, after the client was told why.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from realtime_stt.engine import Engine
from realtime_stt.pipeline import OptionsError, Partial, Pipeline, UtteranceTooLong
from realtime_stt.settings import Settings

logger = logging.getLogger(__name__)

CLOSE_POLICY = 1008  # wrong or missing API key, or a page from an origin that is not allowed
CLOSE_TOO_BIG = 1009  # utterance longer than MAX_UTTERANCE_SECONDS
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # server busy, or the model still loading


class ClientGone(Exception):
    """The client closed the socket or the transport broke."""


class SessionClosed(Exception):
    """The server closed the socket on a policy breach (already told the client why)."""


class ConfigMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["config"] = "config"
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    beam_size: int = Field(default=1, ge=1, le=10)


class StopMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["stop"]


class WebSocketSession:
    """One WebSocket: a receiver and the pipeline under one TaskGroup, so nothing outlives it."""

    def __init__(self, ws: WebSocket, engine: Engine, settings: Settings) -> None:
        self.ws = ws
        self.settings = settings
        self.pipeline = Pipeline(engine, settings, publish=self._send_partial)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive())
                tasks.create_task(self.pipeline.run())
        except* (ClientGone, SessionClosed):
            pass

    # -- transport ---------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self.ws.send_text(json.dumps(message, ensure_ascii=False))
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise ClientGone from exc

    async def _send_partial(self, partial: Partial) -> None:
        await self._send(
            {
                "type": "partial",
                "text": partial.text,
                "committed": partial.committed,
                "tentative": partial.tentative,
                "language": partial.language,
            }
        )

    async def _error(self, message: str) -> None:
        await self._send({"type": "error", "message": message})

    async def _close(self, code: int, reason: str) -> None:
        logger.info("closing session: %s (%d)", reason, code)
        try:
            await self.ws.close(code=code, reason=reason)
        except (RuntimeError, OSError):
            pass  # the client went first; nothing left to tell it
        raise SessionClosed(reason)

    # -- receiving ---------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (RuntimeError, OSError) as exc:
                raise ClientGone from exc
            if message["type"] == "websocket.disconnect":
                raise ClientGone
            if message.get("bytes") is not None:
                await self._on_audio(message["bytes"])
            elif message.get("text") is not None:
                await self._on_text(message["text"])

    async def _on_audio(self, data: bytes) -> None:
        try:
            self.pipeline.feed(data)
        except UtteranceTooLong:
            limit = self.settings.max_utterance_seconds
            await self._close(CLOSE_TOO_BIG, f"utterance longer than MAX_UTTERANCE_SECONDS={limit:g} s; send stop sooner")

    async def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            await self._error(f"invalid JSON: {exc.msg} at position {exc.pos}")
            return
        if not isinstance(message, dict):
            await self._error("a control message must be a JSON object")
            return
        kind = message.get("type", "config")
        try:
            if kind == "config":
                config = ConfigMessage.model_validate(message)
                self.pipeline.configure({name: getattr(config, name) for name in config.model_fields_set - {"type"}})
            elif kind == "stop":
                StopMessage.model_validate(message)
                final = await self.pipeline.finish()
                await self._send(
                    {"type": "final", "text": final.text, "language": final.language, "duration_s": final.duration_s}
                )
            else:
                await self._error(f"unknown message type {kind!r}; expected 'config' or 'stop'")
        except ValidationError as exc:
            await self._error(_describe(exc))
        except OptionsError as exc:
            await self._error(str(exc))


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problems.append(f"{where}: {error['msg']}")
    return "invalid message: " + "; ".join(problems)
