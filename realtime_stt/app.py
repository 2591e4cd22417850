"""The app: the model loaded once in the lifespan, /health, /metrics, the page at /, /ws and the
OpenAI-compatible /v1 routes behind the API key and the allowed origins, the Wyoming server where
WYOMING_PORT is set; on SIGTERM or SIGINT, a drain that sends every final before uvicorn shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from realtime_stt.engine import Engine
from realtime_stt.metrics import Metrics
from realtime_stt.model import ModelLoadError
from realtime_stt.openai_api import OpenAIApi, Serving
from realtime_stt.openai_realtime import RealtimeSession
from realtime_stt.protocol import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    SocketSession,
    WebSocketSession,
    close_reason,
)
from realtime_stt.settings import Settings, SettingsError
from realtime_stt.wyoming_server import WyomingServer

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Service:
    """The app's live state, one owner for each piece: the engine once loaded, the sessions open,
    and whether the server is draining for a restart."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    sessions: set[Any] = field(default_factory=set)  # WebSocket, Realtime and Wyoming sessions: each has a .pipeline
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    no_sessions: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.no_sessions.set()
        self.metrics.sessions_open.set_function(lambda: len(self.sessions))

    def refusal(self) -> tuple[str, str] | None:
        """Why a new session cannot be served now (metric label, close reason), if it cannot.

        A new speaker is admitted while the speakers now (sessions with an utterance under way or
        yet to begin: one whose final went out counts again only with its next audio) are fewer than
        the engine's live capacity; MAX_SESSIONS, where set, caps them too (ADMISSION=fixed: it
        alone; an idle socket costs nothing, and IDLE_TIMEOUT_SECONDS closes it). Partials that
        run late for a sustained while (their median lag past the bound) refuse too: the rest of the
        server, not only the model, may be what is short."""
        if self.draining.is_set():
            return "draining", "server restarting; try again in a moment"
        if self.engine is None:
            return "loading", "model is still loading; try again shortly"
        settings = self.settings
        fixed = settings.admission == "fixed"
        speakers = self.speakers()
        if (fixed or "MAX_SESSIONS" in settings.explicit) and speakers >= settings.max_sessions:
            return "busy", f"server busy: MAX_SESSIONS={settings.max_sessions} reached; try again later"
        capacity = self.engine.capacity()
        if not fixed and speakers >= capacity:
            return "busy", (f"server busy: {speakers} speaker(s) now, and this machine serves about {capacity} "
                            "in real time; try again later")
        lag, bound = self.engine.partial_lag(0.5), self.lag_bound
        if bound and lag > bound:
            return "overloaded", f"server busy: partials are {lag:.1f} s late (bound {bound:g} s); try again later"
        return None

    def speakers(self) -> int:
        """Sessions that count against the capacity: all but those whose last utterance is done."""
        return sum(1 for session in self.sessions if session.pipeline.active)

    def max_sessions(self) -> int:
        """MAX_SESSIONS where set or admission is fixed, else the live capacity."""
        settings = self.settings
        if "MAX_SESSIONS" in settings.explicit or settings.admission == "fixed" or self.engine is None:
            return settings.max_sessions
        return self.engine.capacity()

    @property
    def lag_bound(self) -> float:
        """Seconds late partials may run before new sockets are refused (0: never)."""
        given = self.settings.max_partial_lag_seconds
        return 2 * self.settings.partial_every_ms / 1000 if given is None else given

    @contextlib.contextmanager
    def serving(self, session: Any):
        self.sessions.add(session)
        self.no_sessions.clear()
        try:
            yield
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                self.no_sessions.set()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; without ``settings`` they come from the environment, checked right here."""
    if settings is None:
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            raise SystemExit(f"error: {exc}") from None
    app = FastAPI(title="Realtime speech-to-text", lifespan=_lifespan)
    app.state.service = Service(settings)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.add_api_websocket_route("/ws", _transcribe)
    app.add_api_websocket_route("/v1/realtime", _transcribe_realtime)
    OpenAIApi(app.state.service.metrics, partial(_serving, app.state.service)).add_routes(app)
    return app


def _serving(service: Service, request: Request) -> Serving:
    """What the OpenAI-compatible routes need to know of the app for one request."""
    settings = service.settings
    allowed = origin_allowed(request.headers.get("origin"), request.headers.get("host"), settings.allowed_origins)
    return Serving(settings, service.engine, service.draining.is_set(), allowed)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    settings = service.settings
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    logger.info("loading model %s (device=%s, compute_type=%s)", settings.model_id, settings.device, settings.compute_type)
    began = time.monotonic()
    try:
        engine = await asyncio.to_thread(Engine, settings, service.metrics)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        raise
    await engine.start()
    service.settings = engine.settings  # the working values: calibration's, where the environment set none
    service.engine = engine
    logger.info("model loaded and calibrated on %s in %.1f s; languages: %d", engine.device,
                time.monotonic() - began, len(engine.languages))
    logger.info("%s", engine.plan.describe(settings.model_id, engine.device))
    restore = _drain_on_signals(service)
    wyoming: WyomingServer | None = None
    try:
        if service.settings.wyoming_port is not None:
            wyoming = await WyomingServer.start(service)
        yield
    finally:
        restore()
        if wyoming is not None:
            await wyoming.close()
        service.engine = None
        await engine.close()


def _drain_on_signals(service: Service) -> Callable[[], None]:
    """Take SIGTERM and SIGINT from uvicorn, drain, then hand the signal to uvicorn's own handler
    (which shuts down and exits with the signal's status). A second signal hands over at once.
    Returns what puts uvicorn's handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach only the main thread: nothing to take over
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in DRAIN_SIGNALS}
    draining: set[asyncio.Task[None]] = set()

    def hand_over(sig: int, frame: Any) -> None:
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        else:  # no server of ours installed one: end as the signal would have ended us
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    async def drain(sig: int, frame: Any) -> None:
        service.draining.set()
        logger.info("draining for a restart: %d session(s) get their finals, then 1012", len(service.sessions))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(service.settings.drain_seconds):
                await service.no_sessions.wait()
        if service.sessions:
            logger.warning("DRAIN_SECONDS=%g passed with %d session(s) open", service.settings.drain_seconds, len(service.sessions))
        hand_over(sig, frame)

    def on_signal(sig: int, frame: Any) -> None:
        if service.draining.is_set():
            hand_over(sig, frame)
            return

        def start() -> None:
            task = loop.create_task(drain(sig, frame))
            draining.add(task)
            task.add_done_callback(draining.discard)

        loop.call_soon_threadsafe(start)

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


async def _health(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    settings, engine = service.settings, service.engine
    if engine is None:
        return JSONResponse({"status": "loading", "model": settings.model_id}, status_code=503)
    body = {
        "status": "draining" if service.draining.is_set() else "ok",
        "accepting": service.refusal() is None,
        "model": settings.model_id,
        "device": engine.device,
        "compute_type": settings.compute_type,
        "languages": list(engine.languages),
        "can_translate": engine.can_translate,
        "sessions": len(service.sessions),
        "max_sessions": service.max_sessions(),
        "inference_workers": engine.workers,
        "partial_every_ms": settings.partial_every_ms,
        "inference": service.metrics.inference(),
        "partial_lag_s": round(engine.partial_lag(), 3),
        "max_partial_lag_s": service.lag_bound,
        "calibration": {**engine.plan.as_dict(), "summary": engine.plan.describe(settings.model_id, engine.device)},
        "capacity": {
            "prior": engine.plan.capacity,
            "live": engine.capacity(),
            "speakers": service.speakers(),
            "streaming": engine.streaming(),
            "cost_per_speaker": engine.cost_per_speaker(),
            "partial_alone_s": round(engine.live.costs().partial(1), 3),
            "scale": dict(zip(("partials", "finals"), (round(x, 3) for x in engine.live.scale()))),
            "calls_seen": engine.live.seen,
            "refusing": refusal[1] if (refusal := service.refusal()) else None,
        },
    }
    # ?ready=1 is for probes that read only the status (Kubernetes readiness, a load balancer's
    # check): 503 whenever a new socket would be refused. Without it the codes stay as they were.
    ready_probe = request.query_params.get("ready") in ("1", "true")
    refused = service.draining.is_set() or (ready_probe and not body["accepting"])
    return JSONResponse(body, status_code=503 if refused else 200)


async def _metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    if not service.settings.key_given(request.headers.get("authorization"), request.query_params.get("token")):
        return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}, status_code=401)
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


async def _transcribe(ws: WebSocket) -> None:
    await _serve_socket(ws, WebSocketSession)


async def _transcribe_realtime(ws: WebSocket) -> None:
    await _serve_socket(ws, RealtimeSession)


async def _serve_socket(ws: WebSocket, protocol: type[SocketSession]) -> None:
    """One socket of either protocol, behind the same key, origins, admission and drain."""
    service: Service = ws.app.state.service
    settings, metrics = service.settings, service.metrics
    # Accept first so that every refusal reaches the client as a close code with a reason.
    await ws.accept()
    if (denied := _denied(ws, settings)) is not None:
        metrics.refusals.labels(denied[0]).inc()
        await ws.close(code=CLOSE_POLICY, reason=close_reason(denied[1]))
        return
    if (refused := service.refusal()) is not None:
        metrics.refusals.labels(refused[0]).inc()
        await ws.close(code=CLOSE_TRY_AGAIN, reason=close_reason(refused[1]))
        return
    assert service.engine is not None
    session = protocol(ws, service.engine, settings, service.draining)
    ending = "error"
    with service.serving(session):
        try:
            ending = await session.run()
        except Exception:
            logger.exception("session failed")
            with contextlib.suppress(RuntimeError, OSError):
                await ws.close(code=CLOSE_INTERNAL, reason="internal server error")
        finally:
            metrics.sessions_ended.labels(ending).inc()


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


def _denied(ws: WebSocket, settings: Settings) -> tuple[str, str] | None:
    """Why this socket may not be served at all (metric label, close reason), if it may not."""
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), settings.allowed_origins):
        return "origin", f"origin {ws.headers.get('origin')!r} is not allowed; add it to ALLOWED_ORIGINS"
    if not settings.key_given(ws.headers.get("authorization"), ws.query_params.get("token")):
        return "auth", "missing or wrong API key: send 'Authorization: Bearer <key>' or ?token=<key>"
    return None
