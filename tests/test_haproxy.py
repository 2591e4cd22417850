"""More speakers than one server holds: two real replicas (tiny.en) behind a real HAProxy running
deploy/haproxy.cfg, each replica admitting by its own capacity and the proxy routing by each one's
/health."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets
from conftest import (
    ROOT,
    Server,
    closed,
    free_port,
    manifest,
    read_pcm,
    speak,
    start_server,
    stream,
    wer,
)

from bench.replicas import haproxy_config

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="needs Debian's haproxy (apt-get install haproxy; .ci/run does)")

SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s
SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"  # 11.7 s
WER_BOUND = 0.10
# Each replica gets one of the two cores; set values keep start-up short (one layout calibrated, at
# batch 2) and admission by MAX_SESSIONS alone, so which replica is full is known.
REPLICA = {"CPU_THREADS": "1", "INFERENCE_WORKERS": "1", "MAX_BATCH": "2", "MAX_PARTIAL_LAG_SECONDS": "0"}
SMALL, LARGE = 1, 3  # MAX_SESSIONS of the two replicas


@dataclass
class Cluster:
    url: str  # the proxy's /ws
    stats: str  # the proxy's stats page, as CSV
    small: Server  # MAX_SESSIONS=SMALL, HAProxy's "stt2"
    large: Server  # MAX_SESSIONS=LARGE, "stt1": the first listed, so "balance first" would fill it before the other
    log: Path

    def sessions(self) -> tuple[int, int]:
        return health(self.small)[1]["sessions"], health(self.large)[1]["sessions"]

    def states(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of each server: its row of the stats CSV (status, check_status, check_code...)."""
        with urllib.request.urlopen(self.stats, timeout=5) as response:
            text = response.read().decode().removeprefix("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "replicas"}

    def status(self) -> tuple[str, str]:
        """HAProxy's status of the small replica and of the large one."""
        states = self.states()
        return states["stt2"]["status"], states["stt1"]["status"]


def health(server: Server, query: str = "") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{server.base_url}/health{query}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(what: Callable[[], bool], timeout: float = 15.0, why: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"not within {timeout:g} s {why()}"
        time.sleep(0.05)


def render(large: int, small: int, front: int, stats: int) -> str:
    """deploy/haproxy.cfg with this run's ports, as the benchmark writes it for its replicas (the large
    one is stt1, listed first), and a check every 100 ms instead of every second."""
    text = haproxy_config(front, stats, [large, small])  # it fails unless the shipped lines are there
    assert "inter 1s" in text  # the shipped configuration is what runs here
    return text.replace("inter 1s", "inter 100ms")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    manifest()  # skips when the eval set is missing
    logs = tmp_path_factory.mktemp("haproxy")
    envs = [{**REPLICA, "MAX_SESSIONS": str(SMALL)}, {**REPLICA, "MAX_SESSIONS": str(LARGE)}]
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(2) as pool:  # both replicas load and calibrate at once
            small, large = pool.map(lambda env: stack.enter_context(start_server(env, logs)), envs)
        front, stats = free_port(), free_port()
        config = logs / "haproxy.cfg"
        config.write_text(render(*(int(r.base_url.rsplit(":", 1)[1]) for r in (large, small)), front, stats))
        log = logs / "haproxy.log"
        with log.open("wb") as sink:
            proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=sink, stderr=subprocess.STDOUT)
        stack.callback(proxy.wait, 10)
        stack.callback(proxy.terminate)
        running = Cluster(f"ws://127.0.0.1:{front}/ws", f"http://127.0.0.1:{stats}/stats;csv", small, large, log)
        wait_for(lambda: _answers(stats) and running.status() == ("UP", "UP"), why=lambda: str(running.status()))
        yield running


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def settled(cluster: Cluster) -> None:
    """Wait until HAProxy's checks have caught up: a replica is UP exactly while it accepts."""
    def expected() -> tuple[str, ...]:
        return tuple("UP" if health(r)[1]["accepting"] else "DOWN" for r in (cluster.small, cluster.large))

    wait_for(lambda: cluster.status() == expected(),
             why=lambda: f"for HAProxy's view {cluster.status()} to follow the replicas' accepting {expected()}")


async def refusal(ws, timeout: float = 10.0) -> tuple[int, str]:
    """The close code and reason of a socket the server refuses; an error if it stays open."""
    with pytest.raises(websockets.ConnectionClosed) as closing:
        async with asyncio.timeout(timeout):
            await ws.recv()
    return closing.value.rcvd.code, closing.value.rcvd.reason


def test_sessions_spread_and_go_only_where_there_is_room_and_past_all_of_it_1013(cluster):
    """Two sessions land one on each replica; the small replica, full, is taken out of rotation
    while the large one takes the rest (leastconn alone would hand the small one the fourth
    session), its session going on; when both are full the next client gets 1013 with a reason."""

    async def scenario():
        admitted, counts = [], []
        try:
            for _ in range(SMALL + LARGE):
                admitted.append(await websockets.connect(cluster.url))
                await asyncio.to_thread(wait_for, lambda: sum(cluster.sessions()) == len(admitted), 15,
                                        lambda: f"for {len(admitted)} sessions: the replicas have {cluster.sessions()}")
                await asyncio.to_thread(settled, cluster)
                counts.append(await asyncio.to_thread(cluster.sessions))
            full = await asyncio.to_thread(cluster.status)
            probes = [await asyncio.to_thread(health, cluster.small, q) for q in ("", "?ready=1")]
            began = time.monotonic()
            async with websockets.connect(cluster.url) as late:
                refused = await refusal(late)
            took = time.monotonic() - began
            # Every admitted session is still served, the small replica's too while it is marked DOWN.
            runs = await asyncio.gather(*(speak(ws, read_pcm(SHORT)) for ws in admitted))
        finally:
            for ws in admitted:
                await ws.close()
        return counts, full, probes, refused, took, runs

    counts, full, probes, (code, reason), took, runs = asyncio.run(scenario())
    assert counts[1] == (1, 1)  # spread over both
    assert counts[-1] == (SMALL, LARGE), counts  # none sent to the full one, no refusal on the way
    assert full == ("DOWN", "DOWN")
    (plain, body), (ready, _) = probes
    assert (plain, body["status"], body["accepting"], ready) == (200, "ok", False, 503)  # ?ready=1 alone says 503
    assert code == 1013 and "server busy" in reason and "MAX_SESSIONS" in reason, (code, reason)
    assert took < 5  # an answer at once, not a hang
    for run in runs:
        assert wer(manifest()[SHORT]["text"], run.final["text"]) <= WER_BOUND, run.final
    settled(cluster)  # both back in rotation for the next test
    assert cluster.status() == ("UP", "UP")


def test_the_benchmark_measures_the_replicas_through_the_balancer(cluster, tmp_path):
    from test_bench import run_bench

    front = cluster.url.removeprefix("ws://").removesuffix("/ws")
    name = "en_cmu_goforward.wav"
    _, figures = run_bench(tmp_path, "*.json", 300, "--url", front, "--files", name, "--no-offline", "--speed", "0")
    run = figures["run"]
    assert run["files"] == 1 and run["errors"] == 0 and run["dropped"] == 0
    assert run["wer_final"] <= 0.2
    assert figures["environment"]["url"] == front
    assert run["cpu_per_audio_s"] is None and run["peak_rss_mb"] is None  # not the benchmark's own server
    assert figures["calibration"] is None  # one replica's, not the whole's


def test_sigterm_mid_utterance_gives_the_final_and_new_sessions_go_to_the_other(cluster):
    """A speaker on the large replica is mid-utterance when it gets SIGTERM: the final still comes
    through the proxy, then 1012; the proxy takes the draining replica out of rotation at once,
    and a new speaker is served by the small one."""

    async def scenario():
        first = await websockets.connect(cluster.url)
        await asyncio.to_thread(wait_for, lambda: sum(cluster.sessions()) == 1)
        first_on_small = (await asyncio.to_thread(cluster.sessions))[0] == 1
        await asyncio.to_thread(settled, cluster)
        second = await websockets.connect(cluster.url)  # on the other replica
        await asyncio.to_thread(wait_for, lambda: cluster.sessions() == (1, 1))
        talker, idle = (second, first) if first_on_small else (first, second)
        await idle.close()  # the small replica is free again for the newcomer
        await asyncio.to_thread(wait_for, lambda: cluster.sessions() == (0, 1))
        await asyncio.to_thread(settled, cluster)

        pcm = read_pcm(SHORT) + bytes(16000)  # 5.9 s spoken, 0.5 s of silence: then the signal
        await stream(talker, pcm, speed=2.0)
        cluster.large.process.send_signal(signal.SIGTERM)
        ending = asyncio.create_task(closed(talker))
        speaking_on = asyncio.create_task(stream(talker, read_pcm(SPEECH)))  # audio after it is not waited for
        await asyncio.to_thread(wait_for, lambda: cluster.status() == ("UP", "DOWN"), 10, lambda: str(cluster.status()))
        check = (await asyncio.to_thread(cluster.states))["stt1"]
        async with websockets.connect(cluster.url) as newcomer:
            # The small replica alone: the large one may have drained and exited by now.
            on_small = (await asyncio.to_thread(health, cluster.small))[1]["sessions"]
            served = await speak(newcomer, read_pcm(SHORT))
        result = await ending
        speaking_on.cancel()
        exited = await asyncio.to_thread(cluster.large.process.wait, 20)
        return result, check, on_small, served, exited

    (code, reason, messages), check, on_small, served, exited = asyncio.run(scenario())
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == 1 and finals[0] is messages[-1], messages[-3:]
    assert wer(manifest()[SHORT]["text"], finals[0]["text"]) <= WER_BOUND, finals[0]
    assert code == 1012 and "restarting" in reason
    assert check["check_code"] in ("503", ""), check  # 503 "draining", or already gone
    assert on_small == 1
    assert wer(manifest()[SHORT]["text"], served.final["text"]) <= WER_BOUND, served.final
    assert exited == -signal.SIGTERM


def test_the_overhead_benchmark_starts_replicas_behind_haproxy_and_measures_them_whole(tmp_path):
    """bench --overhead --replicas 2: two near-free replicas behind HAProxy running the shipped
    configuration (its replica lines written for each), every stream through the proxy, and the
    CPU counted over the replicas and HAProxy; nothing of it left running."""
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bench", "--overhead", "--replicas", "2", "--levels", "2", "--sweep-seconds", "3",
         "--files", "en_cmu_goforward.wav", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    [level] = figures["levels"]
    assert level["dropped"] == 0 and level["stream_seconds"] >= 5 and level["model_cpu_s"] > 0
    # The replicas' own CPU is counted, not HAProxy's alone (a near-free server spends tens of ms a stream-second).
    assert figures["server_cpu_all_ms_per_stream_second"] > 10, figures
    [report] = tmp_path.glob("overhead-*[0-9].json")
    written = json.loads(report.read_text())
    assert written["environment"]["replicas"] == 2 and written["calibration"] is None
    assert "2 replicas behind HAProxy" in result.stdout
    [config] = tmp_path.glob("*-haproxy.cfg")
    servers = [line.split()[1:] for line in config.read_text().splitlines() if line.startswith("    server ")]
    assert [name for name, *_ in servers] == ["stt1", "stt2", "stt1-refuse", "stt2-refuse"], servers
    # leastconn gave each replica one of the two streams.
    for replica in sorted(tmp_path.glob("*-server-[12].log")):
        assert '"WebSocket /ws" [accepted]' in replica.read_text(), replica
