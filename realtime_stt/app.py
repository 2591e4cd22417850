"""The app: the model loaded once in the lifespan, /health, the page at /, and /ws behind the API
key and the allowed origins."""

from __future__ import annotations

import asyncio
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from realtime_stt.decoder import ModelLoadError
from realtime_stt.engine import Engine
from realtime_stt.protocol import CLOSE_INTERNAL, CLOSE_POLICY, CLOSE_TRY_AGAIN, WebSocketSession
from realtime_stt.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; without ``settings`` they come from the environment, checked right here."""
    if settings is None:
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            raise SystemExit(f"error: {exc}") from None
    app = FastAPI(title="Realtime speech-to-text", lifespan=_lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.sessions = 0
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.add_api_websocket_route("/ws", _transcribe)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    logger.info("loading model %s (device=%s, compute_type=%s)", settings.model_id, settings.device, settings.compute_type)
    try:
        engine = await asyncio.to_thread(Engine, settings)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        raise
    await asyncio.to_thread(engine.decoder.warm_up)
    await engine.start()
    app.state.engine = engine
    logger.info("model ready on %s; languages: %d", engine.device, len(engine.languages))
    try:
        yield
    finally:
        app.state.engine = None
        await engine.close()


async def _health(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    engine: Engine | None = request.app.state.engine
    if engine is None:
        return JSONResponse({"status": "loading", "model": settings.model_id}, status_code=503)
    return JSONResponse(
        {
            "status": "ok",
            "model": settings.model_id,
            "device": engine.device,
            "compute_type": settings.compute_type,
            "languages": list(engine.languages),
            "can_translate": engine.can_translate,
            "sessions": request.app.state.sessions,
            "max_sessions": settings.max_sessions,
            "inference_workers": engine.workers,
            "partial_every_ms": settings.partial_every_ms,
            "inference": engine.stats,
        }
    )


async def _index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


async def _transcribe(ws: WebSocket) -> None:
    state = ws.app.state
    settings: Settings = state.settings
    # Accept first so that every refusal reaches the client as a close code with a reason.
    await ws.accept()
    if (reason := _denied(ws, settings)) is not None:
        await ws.close(code=CLOSE_POLICY, reason=reason)
        return
    engine: Engine | None = state.engine
    if engine is None:
        await ws.close(code=CLOSE_TRY_AGAIN, reason="model is still loading; try again shortly")
        return
    if state.sessions >= settings.max_sessions:
        reason = f"server busy: MAX_SESSIONS={settings.max_sessions} reached; try again later"
        await ws.close(code=CLOSE_TRY_AGAIN, reason=reason)
        return
    state.sessions += 1
    try:
        await WebSocketSession(ws, engine, settings).run()
    except Exception:
        logger.exception("session failed")
        try:
            await ws.close(code=CLOSE_INTERNAL, reason="internal server error")
        except (RuntimeError, OSError):
            pass
    finally:
        state.sessions -= 1


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Browsers always send Origin; a page from another site must not reach the model (CSWSH).

    Clients that send no Origin (Handy, scripts) are not browsers and pass. A page served by this
    server itself (Origin host equals Host) passes. Entries naming only a host ('localhost') allow
    it on any port and scheme; '*' allows every origin.
    """
    if origin is None or "*" in allowed:
        return True
    parts = urllib.parse.urlsplit(origin.lower())
    if host is not None and parts.netloc == host.lower():
        return True
    netloc_host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    return f"{parts.scheme}://{parts.netloc}" in allowed or netloc_host in allowed


def _denied(ws: WebSocket, settings: Settings) -> str | None:
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), settings.allowed_origins):
        return f"origin {ws.headers.get('origin')!r} is not allowed; add it to ALLOWED_ORIGINS"
    if settings.api_key is not None:
        header = ws.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ws.query_params.get("token", "")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            return "missing or wrong API key: send 'Authorization: Bearer <key>' or ?token=<key>"
    return None
