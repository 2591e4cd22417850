"""A real server for the benchmark: `uvicorn main:app` on 127.0.0.1, its CPU time and peak memory;
or one already running elsewhere (replicas behind a load balancer), whose CPU and memory it cannot see."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import ROOT


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None  # None: a server this benchmark did not start
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def cpu_seconds(self) -> float | None:
        import psutil

        if self.process is None:
            return None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def watch_memory(self) -> None:
        import psutil

        process = psutil.Process(self.process.pid)
        while not self._stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)


@contextlib.contextmanager
def serve(model_id: str, env: dict[str, str], log: Path) -> Iterator[Server]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "MODEL_ID": model_id, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"127.0.0.1:{port}", process)
    watcher = threading.Thread(target=server.watch_memory, daemon=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited ({process.returncode}); see {log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{server.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready in 300 s; see {log}")
            time.sleep(0.2)
        watcher.start()
        yield server
    finally:
        server._stop.set()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def attach(url: str) -> Iterator[Server]:
    """A server already running at ``url`` (host:port), e.g. HAProxy in front of replicas, once its
    /health answers 200."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing ready at http://{url}/health in 60 s: {exc}") from None
        time.sleep(0.5)
    yield Server(url, None)


def health(server: Server) -> dict:
    with urllib.request.urlopen(f"http://{server.url}/health", timeout=5) as response:
        return json.loads(response.read())


def model_seconds(server: Server) -> dict[str, tuple[float, float]]:
    """/metrics' model time by kind: (seconds, calls) so far."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "stt_model_seconds":
            continue
        for sample in family.samples:
            kind = sample.labels.get("kind")
            if sample.name.endswith("_sum"):
                totals.setdefault(kind, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_count"):
                totals.setdefault(kind, [0.0, 0.0])[1] = sample.value
    return {kind: (seconds, calls) for kind, (seconds, calls) in totals.items()}


def model_time_per_call(before: dict, after: dict) -> dict[str, float | None]:
    """Mean seconds a model call of each kind took between two readings of model_seconds."""
    means = {}
    for kind, (seconds, calls) in after.items():
        done = calls - before.get(kind, (0.0, 0.0))[1]
        means[kind] = (seconds - before.get(kind, (0.0, 0.0))[0]) / done if done else None
    return means
