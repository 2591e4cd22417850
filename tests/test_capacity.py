"""The server knows its capacity: calibration at start-up on the real model, MAX_SESSIONS from it,
and admission by measured load, against a real uvicorn with tiny.en."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import websockets
from conftest import metrics, read_pcm, speak, start_server, tiny_model_path

SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s
SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"  # 11.7 s


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
        return json.loads(response.read())


def test_health_tells_what_calibration_measured_and_chose(server):
    body = health(server)
    calibration = body["calibration"]
    measured = calibration["measured"]
    for cost in ("encode_partial", "encode_busy", "encode_final", "generate_1", "generate_batch", "align_1", "align_batch"):
        assert 0 < measured[cost] < 30, (cost, measured)
    assert measured["encode_final"] > measured["encode_partial"]  # 30 s of frames against 15 s
    assert calibration["workers"] == body["inference_workers"] in (1, 2)
    assert calibration["capacity"] >= 2 and calibration["within_bounds"]  # tiny.en holds several speakers here
    assert body["max_sessions"] == calibration["capacity"]  # MAX_SESSIONS unset: the capacity takes its place
    assert body["partial_every_ms"] == calibration["partial_every_ms"] == 500  # tiny.en keeps the asked cadence
    assert body["accepting"] is True
    assert f"about {calibration['capacity']} speaker" in calibration["summary"]
    assert calibration["summary"] in server.log_text()  # said in one line at start-up


def test_loading_the_model_leaves_numpy_one_blas_thread():
    # NumPy's BLAS threads spin after each call; with more than one they took the cores from every
    # encode that followed the features (README, "CPU threads").
    from threadpoolctl import threadpool_info

    from realtime_stt.decoder import load_model
    from realtime_stt.settings import Settings

    load_model(Settings(model_id=tiny_model_path()))
    threads = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert threads and set(threads) == {1}, threadpool_info()


def test_set_values_win_over_calibration(tmp_path):
    env = {"MAX_SESSIONS": "3", "MAX_BATCH": "2", "INFERENCE_WORKERS": "1", "PARTIAL_EVERY_MS": "700",
           "MAX_PARTIAL_LAG_SECONDS": "0"}
    with start_server(env, tmp_path) as server:
        body = health(server)
    assert (body["max_sessions"], body["inference_workers"], body["partial_every_ms"]) == (3, 1, 700)
    assert body["max_partial_lag_s"] == 0  # admission by MAX_SESSIONS alone
    assert body["calibration"]["max_batch"] == 2 and body["calibration"]["workers"] == 1


def test_past_capacity_new_sockets_are_refused_and_the_admitted_are_served(tmp_path):
    """MAX_SESSIONS unset: the calibrated capacity admits; one more gets 1013 with a reason."""
    with start_server({}, tmp_path) as server:
        capacity = health(server)["max_sessions"]

        async def scenario():
            sockets = [await websockets.connect(server.ws_url) for _ in range(capacity)]
            try:
                async with websockets.connect(server.ws_url) as extra:
                    with_reason = await refused(extra)
                health_now = await asyncio.to_thread(health, server)
                served = await speak(sockets[0], read_pcm(SHORT), realtime=2.0)
                after = await asyncio.to_thread(health, server)
            finally:
                for ws in sockets:
                    await ws.close()
            return with_reason, health_now, served, after

        (code, reason), health_now, served, after = asyncio.run(scenario())
    assert code == 1013 and f"MAX_SESSIONS={capacity}" in reason
    assert health_now["accepting"] is False and health_now["sessions"] == capacity
    assert served.final["text"]
    # One speaker is within capacity: the worker kept for finals took no partials.
    assert after["inference"]["partial_batches_helped"] == 0


async def refused(ws) -> tuple[int, str]:
    try:
        async with asyncio.timeout(30):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("not refused")


def test_when_partials_run_late_new_sockets_are_refused_until_they_catch_up(tmp_path):
    """A cadence no CPU keeps (every 50 ms) makes partials late at once: the live lag, not the
    session count, refuses the next speaker; when the speakers stop, the server accepts again. So
    loaded, the sessions keep their partial windows at half WINDOW_SECONDS, for cheaper partials."""
    with start_server({"PARTIAL_EVERY_MS": "50", "MAX_SESSIONS": "16"}, tmp_path) as server:

        async def talk():
            async with websockets.connect(server.ws_url) as ws:
                return await speak(ws, read_pcm(SPEECH), realtime=1.0)

        async def scenario():
            speakers = [asyncio.create_task(talk()) for _ in range(3)]
            await asyncio.sleep(5)
            during = await asyncio.to_thread(health, server)
            async with websockets.connect(server.ws_url) as late:
                with_reason = await refused(late)
            finals = await asyncio.gather(*speakers)
            deadline = time.monotonic() + 30
            while not (after := await asyncio.to_thread(health, server))["accepting"]:
                assert time.monotonic() < deadline, after
                await asyncio.sleep(0.5)
            return during, with_reason, finals, after

        during, (code, reason), finals, after = asyncio.run(scenario())
        windows = metrics(server)
    assert during["max_partial_lag_s"] == 0.1  # twice the cadence, unless set
    assert during["accepting"] is False and during["partial_lag_s"] > 0.1
    # Past the calibrated capacity the worker kept for finals takes partial batches too.
    assert during["inference_workers"] == 2 and during["inference"]["partial_batches_helped"] > 0, during
    assert code == 1013 and "late" in reason
    assert all(run.final["text"] for run in finals)  # the admitted are still served
    assert after["partial_lag_s"] <= 0.1
    # Windows slide at 3 s, not 6 s, and are read a decode later at most: none reached 5 s.
    assert windows["stt_partial_window_seconds_count"] >= 10
    assert windows["stt_partial_window_seconds_bucket{le=5.0}"] == windows["stt_partial_window_seconds_count"], windows
