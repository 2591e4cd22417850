"""The OpenAI-compatible audio API, a thin adapter over the engine for the clients that post a whole
recording: OpenAI's own `openai` package, Open WebUI, dictation tools, Handy's remote builds.

``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` take OpenAI's multipart form
(``file``, ``model``, ``language``, ``prompt``, ``response_format``, ``temperature``,
``timestamp_granularities[]``, ``stream``); ``GET /v1/models`` lists the loaded model. The file is
read by PyAV and decoded as offline faster-whisper decodes it, each 30 s window one engine job at
the lowest priority, so live speakers come first. Errors come in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from realtime_stt.audio_file import AudioTooLong, NotAudio, read_audio
from realtime_stt.decoder import DecodeOptions, Segment
from realtime_stt.engine import Engine, FileDecode
from realtime_stt.metrics import Metrics
from realtime_stt.pipeline import OptionsError, check_can_translate, language_choice
from realtime_stt.settings import Settings

logger = logging.getLogger(__name__)

MIB = 1 << 20
# Whisper reads at most the last 223 tokens of a prompt: a longer one is cut to its last characters.
PROMPT_CHARS = 2000
RETRY_AFTER_SECONDS = 5
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request refused, with its status, OpenAI's error fields and the label it is counted under."""

    def __init__(self, status: int, message: str, *, result: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.result, self.param, self.code = status, message, result, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES[self.status], "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=retry)


class _TooLarge(Exception):
    """The body went past MAX_UPLOAD_MB while it was read."""


@dataclass(frozen=True)
class Serving:
    """What the app tells the adapter about one request: the working settings, the engine (None
    while the model loads), whether the server drains for a restart, and whether the request's
    origin may reach the model."""

    settings: Settings
    engine: Engine | None
    draining: bool
    origin_allowed: bool


class UploadForm(BaseModel):
    """The form's fields other than the file, as OpenAI names them."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""  # accepted and not used: the loaded model answers
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["word", "segment"]] = []
    stream: bool = False


TEXT_FIELDS = ("model", "language", "prompt", "response_format", "temperature", "stream")


class OpenAIApi:
    """The routes, and the uploads in the server (at most MAX_UPLOADS: the rest get 429)."""

    def __init__(self, metrics: Metrics, serving: Callable[[Request], Serving]) -> None:
        self.metrics = metrics
        self._serving = serving
        self._uploads = 0
        metrics.uploads_active.set_function(lambda: self._uploads)

    def add_routes(self, app: FastAPI) -> None:
        app.add_api_route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"])
        app.add_api_route("/v1/audio/translations", self.translations, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])

    async def models(self, request: Request) -> Response:
        serving = self._serving(request)
        try:
            _admit(request, serving)
        except ApiError as error:
            return error.response()
        model = {"id": model_name(serving.settings.model_id), "object": "model", "created": 0, "owned_by": "realtime-stt"}
        return JSONResponse({"object": "list", "data": [model]})

    async def transcriptions(self, request: Request) -> Response:
        return await self._upload(request, "transcribe")

    async def translations(self, request: Request) -> Response:
        return await self._upload(request, "translate")

    async def _upload(self, request: Request, task: str) -> Response:
        """Refuse what can be refused before the body is read (key, availability, a translation the
        model cannot make, a declared length past the limit, no room); then read, decode, answer."""
        serving = self._serving(request)
        settings = serving.settings
        holding = False
        form: FormData | None = None
        try:
            engine = _admit(request, serving)
            if task == "translate":
                _translatable(engine, settings)
            _check_declared_length(request, settings)
            if self._uploads >= settings.max_uploads:
                raise ApiError(429, f"server busy: MAX_UPLOADS={settings.max_uploads} uploads are in the server; "
                               "try again later", result="busy", code="rate_limit_exceeded")
            self._uploads += 1
            holding = True
            form = await _read_form(request, settings)
            fields = _fields(form)
            options = _decode_options(engine, fields, task)
            words = "word" in fields.timestamp_granularities
            # The decoded audio is handed on, not kept here: the decode holds what it still needs.
            async with _watching(request) as gone:
                decode = await engine.open_file(await _audio(_file(form), settings), options, words=words, is_stale=gone.is_set)
                if fields.stream:
                    outcome = ["client_gone"]
                    holding = False  # the stream lets go of its slot when it ends, however it ends
                    return _Stream(self._events(request, engine, decode, outcome), lambda: self._streamed(outcome[0]))
                segments = [segment async for segment in _segments(engine, decode, gone)]
            self._answered(decode)
            return _answer(fields, task, decode, segments)
        except ApiError as error:
            self.metrics.uploads.labels(error.result).inc()
            return error.response()
        except ClientDisconnect:
            self.metrics.uploads.labels("client_gone").inc()
            return Response(status_code=499)  # nobody reads it
        except Exception:
            logger.exception("upload failed")
            self.metrics.uploads.labels("error").inc()
            return ApiError(500, "internal server error", result="error").response()
        finally:
            if holding:
                self._uploads -= 1
            if form is not None:
                await form.close()

    async def _events(
        self, request: Request, engine: Engine, decode: FileDecode | None, outcome: list[str]
    ) -> AsyncIterator[str]:
        """OpenAI's transcript stream: a ``transcript.text.delta`` per segment as it is decoded, then
        ``transcript.text.done`` with the whole text; an ``error`` event if the decode fails.
        ``outcome[0]`` says how it ended."""
        try:
            async with _watching(request) as gone:
                text = ""
                async for segment in _segments(engine, decode, gone):
                    delta = segment.text if text else segment.text.lstrip()
                    text += delta
                    yield _event({"type": "transcript.text.delta", "delta": delta})
                yield _event({"type": "transcript.text.done", "text": text.strip()})
                outcome[0] = "ok"
                self.metrics.upload_audio_seconds.inc(decode.duration)
        except ClientDisconnect:
            return  # nobody reads the rest; outcome[0] stays "client_gone"
        except Exception:
            logger.exception("upload failed while streaming")
            outcome[0] = "error"
            yield _event({"type": "error", **ApiError(500, "internal server error", result="error").body()})

    def _streamed(self, result: str) -> None:
        self._uploads -= 1
        self.metrics.uploads.labels(result).inc()

    def _answered(self, decode: FileDecode) -> None:
        self.metrics.uploads.labels("ok").inc()
        self.metrics.upload_audio_seconds.inc(decode.duration)


class _Stream(StreamingResponse):
    """A server-sent event stream that calls ``ended`` when the response is over, however it ended
    (an event generator never started runs no ``finally`` of its own)."""

    def __init__(self, events: AsyncIterator[str], ended: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._ended = ended

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ended()


def model_name(model_id: str) -> str:
    """The model's name for clients: a local directory's own name (not its path), else MODEL_ID."""
    path = Path(model_id).expanduser()
    return path.name if path.is_dir() else model_id


def _admit(request: Request, serving: Serving) -> Engine:
    """The engine, if this request may use it now; else ApiError (403, 401, 503)."""
    if not serving.origin_allowed:
        origin = request.headers.get("origin", "")[:100]
        raise ApiError(403, f"origin {origin!r} is not allowed; add it to ALLOWED_ORIGINS", result="auth",
                       code="origin_not_allowed")
    if not serving.settings.key_given(request.headers.get("authorization")):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", result="auth",
                       code="invalid_api_key")
    if serving.draining:
        raise ApiError(503, "server restarting; try again in a moment", result="unavailable", code="server_restarting")
    if serving.engine is None:
        raise ApiError(503, "model is still loading; try again shortly", result="unavailable", code="model_loading")
    return serving.engine


def _translatable(engine: Engine, settings: Settings) -> None:
    try:
        check_can_translate(engine, settings.model_id)
    except OptionsError as exc:
        raise ApiError(400, str(exc), result="bad_request", param="model", code="model_cannot_translate") from None


def _too_large(settings: Settings) -> ApiError:
    return ApiError(413, f"request body larger than MAX_UPLOAD_MB={settings.max_upload_mb:g} MiB", result="too_large",
                    param="file", code="file_too_large")


def _check_declared_length(request: Request, settings: Settings) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_mb * MIB:
        raise _too_large(settings)


async def _read_form(request: Request, settings: Settings) -> FormData:
    """The multipart form, read up to MAX_UPLOAD_MB (a body sent without its length is counted as
    it comes); the file is spooled to disk past 1 MiB."""
    limit, received = settings.max_upload_mb * MIB, 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
        return message

    try:
        return await Request(request.scope, receive).form(max_files=1, max_fields=32)
    except _TooLarge:
        raise _too_large(settings) from None
    except HTTPException as exc:
        raise ApiError(400, f"the request is not a form OpenAI's API takes: {exc.detail}", result="bad_request") from None


def _file(form: FormData) -> UploadFile:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "'file' is required: the audio, sent as a multipart file", result="bad_request",
                       param="file", code="missing_file")
    upload.file.seek(0)
    return upload


async def _audio(upload: UploadFile, settings: Settings) -> Any:
    """The file's audio, decoded in a worker thread; ApiError for a file that is not audio (400) or
    runs past MAX_UPLOAD_SECONDS (413)."""
    try:
        return await asyncio.to_thread(read_audio, upload.file, settings.max_upload_seconds)
    except NotAudio as exc:
        raise ApiError(400, f"'file' is not audio this server can read: {exc}", result="bad_request", param="file",
                       code="invalid_audio") from None
    except AudioTooLong as exc:
        raise ApiError(413, f"{exc}: past MAX_UPLOAD_SECONDS={settings.max_upload_seconds:g}", result="too_large",
                       param="file", code="audio_too_long") from None


def _fields(form: FormData) -> UploadForm:
    """The fields, checked; ApiError naming the first bad one. Fields OpenAI's clients send that this
    server has no use for (``include[]``, ``chunking_strategy``...) are ignored."""
    raw: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = form.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ApiError(400, f"'{name}' must be a text field, not a file", result="bad_request", param=name,
                               code="invalid_value")
            raw[name] = value
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    if granularities:
        raw["timestamp_granularities"] = granularities
    try:
        fields = UploadForm.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = str(error["loc"][0]) if error["loc"] else None
        param = "timestamp_granularities[]" if param == "timestamp_granularities" else param
        raise ApiError(400, f"invalid '{param}': {error['msg']}", result="bad_request", param=param,
                       code="invalid_value") from None
    if fields.timestamp_granularities and fields.response_format != "verbose_json":
        raise ApiError(400, "timestamp_granularities[] needs response_format 'verbose_json'", result="bad_request",
                       param="timestamp_granularities[]", code="invalid_value")
    if fields.stream and fields.response_format not in ("json", "text"):
        raise ApiError(400, "stream=true answers with transcript.text events: use response_format 'json' or 'text'",
                       result="bad_request", param="stream", code="invalid_value")
    return fields


def _decode_options(engine: Engine, fields: UploadForm, task: str) -> DecodeOptions:
    """Offline faster-whisper's decode (greedy; temperature fallback from the one asked for, as
    Whisper's own command does; the prompt before the first window)."""
    try:
        language = language_choice(engine, fields.language)
    except OptionsError as exc:
        raise ApiError(400, str(exc), result="bad_request", param="language", code="unsupported_language") from None
    steps = int((1.0 - fields.temperature) / 0.2 + 1e-9)
    temperatures = tuple(round(fields.temperature + 0.2 * i, 2) for i in range(steps + 1))
    prompt = (fields.prompt or "")[-PROMPT_CHARS:] or None
    return DecodeOptions(language=language, task=task, beam_size=1, prompt=prompt, temperatures=temperatures, offline=True)


@contextlib.asynccontextmanager
async def _watching(request: Request) -> AsyncIterator[asyncio.Event]:
    """An event set once the client has gone, so that its waiting windows are dropped unrun."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        watcher.cancel()


async def _segments(engine: Engine, decode: FileDecode | None, gone: asyncio.Event) -> AsyncIterator[Segment]:
    """The file's segments, each as its window is decoded; ClientDisconnect once the client has gone
    (``decode`` is None when it went before the decode could start)."""
    while decode is not None and (segment := await engine.next_segment(decode, gone.is_set)) is not None:
        yield segment
    if decode is None or gone.is_set():
        raise ClientDisconnect


def _answer(fields: UploadForm, task: str, decode: FileDecode, segments: list[Segment]) -> Response:
    text = "".join(s.text for s in segments).strip()
    usage = {"type": "duration", "seconds": round(decode.duration, 3)}
    if fields.response_format == "text":
        return PlainTextResponse(text + "\n")
    if fields.response_format == "srt":
        return PlainTextResponse(srt(segments))
    if fields.response_format == "vtt":
        return PlainTextResponse(vtt(segments), media_type="text/vtt")
    if fields.response_format == "json":
        return JSONResponse({"text": text, "usage": usage})
    body: dict[str, Any] = {"task": task, "language": decode.language or "", "duration": round(decode.duration, 3), "text": text}
    granularities = fields.timestamp_granularities or ["segment"]
    if "segment" in granularities:
        body["segments"] = [_segment_json(s) for s in segments]
    if "word" in granularities:
        body["words"] = [{"word": w.text.strip(), "start": w.start, "end": w.end} for s in segments for w in s.words]
    body["usage"] = usage
    return JSONResponse(body)


def _segment_json(segment: Segment) -> dict[str, Any]:
    return {
        "id": segment.id - 1, "seek": segment.seek, "start": segment.start, "end": segment.end, "text": segment.text,
        "tokens": list(segment.tokens), "temperature": segment.temperature, "avg_logprob": segment.avg_logprob,
        "compression_ratio": segment.compression_ratio, "no_speech_prob": segment.no_speech_prob,
    }


def srt(segments: list[Segment]) -> str:
    return "\n".join(
        f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n" for i, s in enumerate(segments, 1)
    )


def vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "\n".join(f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments)


def _stamp(seconds: float, decimal: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    whole, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal}{milliseconds:03d}"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
