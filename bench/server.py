"""A real server for the benchmark: `uvicorn main:app` on 127.0.0.1, its CPU time and peak memory;
or one already running elsewhere (replicas behind a load balancer), whose CPU and memory it cannot see."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
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
    # Replicas behind a balancer of our own (bench/replicas.py): ``process`` is the balancer's, and
    # the CPU and the model's figures are the sums over them all.
    replicas: list[Server] = field(default_factory=list)

    def cpu_seconds(self) -> float | None:
        import psutil

        if self.process is None:
            return None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system + sum(replica.cpu_seconds() for replica in self.replicas)

    def watch_memory(self) -> None:
        import psutil

        process = psutil.Process(self.process.pid)
        while not self._stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)


PR_SET_PDEATHSIG = 1


def _die_with_parent(prctl, parent: int) -> None:
    """In the server's process, before it runs: the kernel sends it SIGTERM when the benchmark ends,
    however it ends (SIGKILL included), so no server outlives the run that started it (Linux).
    ``prctl`` is looked up before the fork: nothing is loaded in the child."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the benchmark was gone before the line above took effect
        os._exit(1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM ends the benchmark as Ctrl-C does: through every `finally`, which stops the server.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def serve(model_id: str, env: dict[str, str], log: Path) -> Iterator[Server]:
    """A server of our own, stopped on the way out however the benchmark is stopped: Ctrl-C
    (KeyboardInterrupt), SIGTERM (made a SystemExit here), or its death (the kernel's signal). It
    runs in a session of its own, so that a terminal's Ctrl-C reaches the benchmark alone and the
    server is stopped by the `finally` below, and ends with every process it started."""
    port = free_port()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main else None
    try:
        process = spawn([sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
                        {**os.environ, "MODEL_ID": model_id, **env}, log)
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
            stop(process)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(argv: list[str], env: dict[str, str] | None, log: Path) -> subprocess.Popen:
    """A process of the benchmark's, output to ``log``, in a session of its own, that the kernel
    ends with the benchmark (Linux). The kernel's signal follows the thread that started the
    process: only the main one lives as long as the benchmark does."""
    in_main = threading.current_thread() is threading.main_thread()
    prctl = ctypes.CDLL(None).prctl if in_main and sys.platform == "linux" else None
    parent = os.getpid()
    with log.open("wb") as sink:
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: _die_with_parent(prctl, parent)) if prctl else None,
        )


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole session (it drains: DRAIN_SECONDS at most), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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


def _metrics(server: Server) -> list[str]:
    """The /metrics text of the server, or of each of its replicas."""
    texts = []
    for one in server.replicas or [server]:
        with urllib.request.urlopen(f"http://{one.url}/metrics", timeout=5) as response:
            texts.append(response.read().decode())
    return texts


def model_seconds(server: Server) -> dict[str, tuple[float, float]]:
    """/metrics' model time by kind: (seconds, calls) so far."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = {}
    for text in _metrics(server):
        for family in text_string_to_metric_families(text):
            if family.name != "stt_model_seconds":
                continue
            for sample in family.samples:
                total = totals.setdefault(sample.labels.get("kind"), [0.0, 0.0])
                if sample.name.endswith("_sum"):
                    total[0] += sample.value
                elif sample.name.endswith("_count"):
                    total[1] += sample.value
    return {kind: (seconds, calls) for kind, (seconds, calls) in totals.items()}


def model_cpu_seconds(server: Server) -> float | None:
    """/metrics' CPU time of the model's own threads so far (None where a server has no such series)."""
    total = 0.0
    for text in _metrics(server):
        found = [float(line.split()[1]) for line in text.splitlines() if line.startswith("stt_model_cpu_seconds_total ")]
        if not found:
            return None
        total += found[0]
    return total


def model_calls(before: dict, after: dict) -> dict[str, int]:
    """How many model calls of each kind ran between two readings of model_seconds."""
    return {kind: int(calls - before.get(kind, (0.0, 0.0))[1]) for kind, (_, calls) in after.items()}


def model_time_per_call(before: dict, after: dict) -> dict[str, float | None]:
    """Mean seconds a model call of each kind took between two readings of model_seconds."""
    means = {}
    for kind, (seconds, calls) in after.items():
        done = calls - before.get(kind, (0.0, 0.0))[1]
        means[kind] = (seconds - before.get(kind, (0.0, 0.0))[0]) / done if done else None
    return means
