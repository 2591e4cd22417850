"""A server to leave running: idle sockets freed, restarts that lose no words, slow readers that
harm no one, and metrics, each against a real uvicorn with the real tiny.en model."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

import psutil
import pytest
import websockets
from conftest import (
    closed,
    manifest,
    metrics,
    read_pcm,
    speak,
    start_server,
    stream,
    wer,
)

SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"  # 11.7 s
SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s
THIRD = "en_librispeech_dev-clean_1272-141231-0002.wav"  # 13.3 s
JFK = "en_jfk_inaugural_1961.wav"  # 11.0 s
WER_BOUND = 0.10


def run(coroutine):
    return asyncio.run(coroutine)


def get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.base_url + path, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory):
    env = {"IDLE_TIMEOUT_SECONDS": "2", "MAX_SESSIONS": "2"}
    with start_server(env, tmp_path_factory.mktemp("idle")) as running:
        yield running


def test_idle_sockets_are_closed_and_free_their_slots(idle_server):
    async def scenario():
        async with websockets.connect(idle_server.ws_url) as first, websockets.connect(idle_server.ws_url) as second:
            await asyncio.sleep(0.3)
            async with websockets.connect(idle_server.ws_url) as third:
                refused = await closed(third)
            began = time.monotonic()
            idle = await asyncio.gather(closed(first), closed(second))
            waited = time.monotonic() - began
        async with websockets.connect(idle_server.ws_url) as fourth:
            served = await speak(fourth, read_pcm(SHORT))
        return refused, idle, waited, served

    before = metrics(idle_server)
    refused, idle, waited, served = run(scenario())
    assert refused[0] == 1013
    for code, reason, _ in idle:
        assert code == 1000 and "idle" in reason and "IDLE_TIMEOUT_SECONDS" in reason, reason
    assert waited < 4.0
    assert wer(manifest()[SHORT]["text"], served.final["text"]) <= WER_BOUND
    after = metrics(idle_server)
    assert after["stt_sessions_ended_total{reason=idle}"] - before["stt_sessions_ended_total{reason=idle}"] == 2
    assert after["stt_refusals_total{reason=busy}"] - before["stt_refusals_total{reason=busy}"] == 1


def test_a_socket_streaming_or_waiting_for_its_final_is_never_idle(idle_server):
    """Frames 1.5 s apart for 9 s, then the final of 42 s of speech sent at once: never idle."""
    long = b"".join(map(read_pcm, (SPEECH, SHORT, THIRD, JFK)))

    async def scenario():
        async with websockets.connect(idle_server.ws_url) as ws:
            slow = read_pcm(SHORT)
            for offset in range(0, len(slow), len(slow) // 6):
                await ws.send(slow[offset : offset + len(slow) // 6])
                await asyncio.sleep(1.5)
            first = await speak(ws, b"")
            second = await speak(ws, long, frame_bytes=64000)
            return first, second, await closed(ws)  # then idle, and closed as such

    first, second, (code, reason, _) = run(scenario())
    assert wer(manifest()[SHORT]["text"], first.final["text"]) <= WER_BOUND
    assert "fellow americans" in second.final["text"].lower()
    assert code == 1000 and "idle" in reason


def test_metrics_count_what_the_server_did(idle_server):
    before = metrics(idle_server)
    result = run(one_utterance(idle_server.ws_url, SPEECH, realtime=2.0))
    after = metrics(idle_server)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert result.partials and result.final["text"]
    assert grew("stt_audio_seconds_total") == pytest.approx(11.66, abs=0.01)
    assert grew("stt_final_latency_seconds_count") == 1
    assert grew("stt_partial_latency_seconds_count") >= len(result.partials) - 1
    assert grew("stt_model_seconds_count{kind=partial}") >= 1
    assert grew("stt_model_seconds_count{kind=final}") + grew("stt_speculative_finals_total") >= 1
    assert grew("stt_batch_size_count") >= 2 and grew("stt_batch_size_sum") >= grew("stt_batch_size_count")
    assert 1 <= grew("stt_partial_window_seconds_count") <= grew("stt_batch_size_sum")  # a window a partial decode
    for name in ("stt_sessions_open", "stt_queue_depth", "stt_stale_dropped_total", "stt_decodes_skipped_total",
                 "stt_asyncio_tasks", "stt_refusals_total{reason=auth}", "stt_partials_replaced_total"):
        assert name in after, name
    assert after["stt_asyncio_tasks"] > 0
    # /health reads the same counters.
    health = json.loads(get(idle_server, "/health")[1])["inference"]
    assert health["decodes"] == after["stt_batch_size_sum"] and health["batches"] == after["stt_batch_size_count"]


async def one_utterance(url: str, name: str, **kwargs):
    async with websockets.connect(url) as ws:
        return await speak(ws, read_pcm(name), **kwargs)


def test_sigterm_mid_utterance_sends_every_final_then_1012_and_exits(tmp_path):
    """SIGTERM while one speaker talks in real time, another's 84 s utterance waits for its final
    and a third socket is idle: both finals come, then 1012; the idle one gets 1012 at once; new
    sockets and /health say the server is draining; the process ends within DRAIN_SECONDS."""
    drain = 10.0
    # Long enough that its final outlasts the checks made during the drain: with a 42 s one, a
    # fast machine had finished the drain and closed its port before the upload was tried.
    long = b"".join(map(read_pcm, (SPEECH, SHORT, THIRD, JFK))) * 2
    # Three sockets at once whatever this machine's calibration admits: this is the drain's test,
    # not admission's (a busy machine can calibrate tiny.en at one speaker).
    env = {"DRAIN_SECONDS": str(drain), "MAX_SESSIONS": "8", "MAX_PARTIAL_LAG_SECONDS": "0"}
    with start_server(env, tmp_path) as server:

        async def scenario():
            async with (
                websockets.connect(server.ws_url) as talking,
                websockets.connect(server.ws_url) as waiting,
                websockets.connect(server.ws_url) as idle,
            ):
                spoken = read_pcm(SHORT) + bytes(16000)  # 5.9 s spoken, 0.5 s of silence
                await stream(talking, spoken)
                await waiting.send(long)
                # The 2.7 MB frame must have reached the server before the signal: a session with no
                # audio yet rightly gets 1012 without a final, and that is not what this tests.
                await asyncio.to_thread(audio_received, server, (len(spoken) + len(long)) / 32000)
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                ends = [asyncio.create_task(closed(ws)) for ws in (talking, waiting, idle)]
                speaking_on = asyncio.create_task(stream(talking, read_pcm(SPEECH)))  # audio after it is not waited for
                health = await asyncio.to_thread(draining_health, server)
                await asyncio.to_thread(upload_refused_while_draining, server)
                async with websockets.connect(server.ws_url) as late:
                    refused = await closed(late)
                results = await asyncio.gather(*ends)
                speaking_on.cancel()
                exited = await asyncio.to_thread(server.process.wait, drain + 10)
                return results, health, refused, exited, time.monotonic() - signalled

        (talking, waiting, idle), health, refused, exited, took = run(scenario())
    assert health["status"] == "draining"
    assert refused[0] == 1013 and "restarting" in refused[1]
    for code, reason, messages in (talking, waiting):
        assert code == 1012 and "restarting" in reason
        finals = [m for m in messages if m["type"] == "final"]
        assert len(finals) == 1 and finals[0] is messages[-1], messages[-3:]
    assert wer(manifest()[SHORT]["text"], talking[2][-1]["text"]) <= WER_BOUND, talking[2][-1]
    assert "fellow americans" in waiting[2][-1]["text"].lower()
    assert idle[0] == 1012 and idle[2] == []
    assert exited == -signal.SIGTERM  # uvicorn ends with the signal it handled
    assert took <= drain


def audio_received(server, seconds: float) -> None:
    """Wait until the server has counted ``seconds`` of audio in all (polled)."""
    deadline = time.monotonic() + 10
    while metrics(server)["stt_audio_seconds_total"] < seconds - 0.01:
        assert time.monotonic() < deadline, "the audio never reached the server"
        time.sleep(0.01)


def draining_health(server) -> dict:
    """/health from the moment the signal is handled: 503 and 'draining' (polled until it says so)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, body = get(server, "/health")
        if status == 503:
            return json.loads(body)
        time.sleep(0.01)
    raise AssertionError("/health never said draining")


def upload_refused_while_draining(server) -> None:
    """An upload to the OpenAI-compatible API during the drain: 503 in OpenAI's shape."""
    import openai

    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        api.audio.transcriptions.create(model="whisper-1", file=("speech.wav", b"RIFF"))
    assert refused.value.status_code == 503 and refused.value.response.json()["error"]["code"] == "server_restarting"


def test_a_client_that_never_reads_costs_no_memory_and_delays_no_one(tmp_path):
    """40 s of audio from a client that reads nothing, beside a speaker in real time; then a
    client that floods the server with messages it must answer and reads none of the answers."""
    # The warm-up opens four sessions at once: the limit is not left to calibration, which on a busy
    # machine can admit three (and refuse the fourth with 1013).
    env = {"SEND_TIMEOUT_SECONDS": "3", "MAX_SESSIONS": "8"}
    hour = b"".join(map(read_pcm, (SPEECH, THIRD, JFK, SHORT)))[: 40 * 32000]
    with start_server(env, tmp_path) as server:
        process = psutil.Process(server.process.pid)

        async def never_reads():
            async with websockets.connect(server.ws_url, max_queue=1) as ws:
                await stream(ws, hour, speed=2.0)
                await ws.send(json.dumps({"type": "stop"}))

        async def scenario():
            # Warm the server up first (batches of several windows of every length, finals), so that
            # what grows after is the slow client's doing.
            names = (SPEECH, THIRD, JFK, SHORT)
            await asyncio.gather(*(one_utterance(server.ws_url, name, realtime=3.0) for name in names))
            silent = asyncio.create_task(never_reads())
            await asyncio.sleep(5)
            rss_early = process.memory_info().rss
            async with websockets.connect(server.ws_url) as ws:  # speaks while the silent one streams
                reader = [await speak(ws, read_pcm(name), realtime=1.0) for name in (SPEECH, SHORT)]
            await silent
            return rss_early, process.memory_info().rss, reader

        rss_early, rss_late, reader = run(scenario())
        cadence = sorted(b - a for run_ in reader for (a, _), (b, _) in zip(run_.messages, run_.messages[1:]))
        assert cadence[int(0.95 * (len(cadence) - 1))] <= 1.0, cadence[-5:]
        assert all(wer(manifest()[n]["text"], r.final["text"]) <= WER_BOUND + 0.13 for n, r in zip((SPEECH, SHORT), reader))
        # The model's allocations saw RSS up and down by about 15 % from one second to the next
        # (bench/results/history.md, Soak); what a client that never reads could pile up is far more than that.
        assert rss_late - rss_early < 0.25 * rss_early, (rss_early, rss_late)

        async def floods():
            ws = await websockets.connect(server.ws_url, max_queue=1)
            try:
                async with asyncio.timeout(20):
                    for _ in range(20_000):  # each one answered with an error the client never reads
                        await ws.send(json.dumps({"language": "klingon" * 40}))
            except (TimeoutError, websockets.ConnectionClosed):
                pass  # the server stopped reading it: it gave up on this client
            finally:
                ws.transport.abort()

        before = metrics(server)
        run(floods())
        for _ in range(50):
            if metrics(server)["stt_sessions_ended_total{reason=slow_reader}"] > before["stt_sessions_ended_total{reason=slow_reader}"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the client that read nothing was never closed")
        assert json.loads(get(server, "/health")[1])["sessions"] == 0
