"""The server admits as many speakers as its live capacity, against a real uvicorn with tiny.en:
the prior from start-up, the live costs as it serves, a burst right-sized, a push-to-talk speaker's
next socket never refused by its last one, and late partials refusing only while they stay late."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import websockets
from conftest import metrics, read_pcm, speak, start_server, tiny_model_path

SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s
SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"  # 11.7 s
LIVE = {"ADMISSION": "live", "INFERENCE_WORKERS": ""}  # the defaults: live admission, layout by calibration


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    with start_server(LIVE, tmp_path_factory.mktemp("live")) as running:
        yield running


async def refused(ws, timeout: float = 30) -> tuple[int, str]:
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("not refused")


def test_a_burst_admits_the_capacity_at_once_and_refuses_the_rest_with_a_reason(live_server):
    """Sixteen clients connect at once: as many as the capacity are admitted and served to their
    finals, none of them cut later; the rest get 1013 with a reason straight away."""
    before = health(live_server)
    capacity = before["capacity"]["live"]
    assert before["max_sessions"] == capacity and before["accepting"] is True
    pcm = read_pcm(SHORT)

    async def client() -> tuple[str, object]:
        async with websockets.connect(live_server.ws_url) as ws:
            try:
                async with asyncio.timeout(1.0):  # a refusal comes at the door
                    await ws.recv()
            except TimeoutError:
                return "admitted", await speak(ws, pcm, realtime=1.0)
            except websockets.ConnectionClosed as closed:
                return "refused", (closed.rcvd.code, closed.rcvd.reason)
            raise AssertionError("a message before any audio")

    async def burst():
        return await asyncio.gather(*(client() for _ in range(16)))

    outcomes = asyncio.run(burst())
    admitted = [run for kind, run in outcomes if kind == "admitted"]
    refusals = [why for kind, why in outcomes if kind == "refused"]
    assert len(admitted) == capacity < 16, outcomes
    assert all(run.final["text"] for run in admitted)  # every admitted speaker got its final
    assert {code for code, _ in refusals} == {1013}
    assert all("server busy" in reason and f"serves about {capacity}" in reason for _, reason in refusals), refusals
    after = health(live_server)
    assert after["capacity"]["calls_seen"]["finals"] >= capacity


def test_health_tells_the_prior_the_live_capacity_and_what_a_speaker_costs(live_server):
    body = health(live_server)
    calibration, capacity = body["calibration"], body["capacity"]
    measured = calibration["measured"]
    for cost in ("partial_fixed", "partial_row", "final_fixed", "final_per_second"):
        assert 0 <= measured[cost] < 30, (cost, measured)
    assert measured["partial_row"] > 0 and measured["final_fixed"] > 0
    assert calibration["workers"] == body["inference_workers"] == 2  # two threads: two workers of one
    assert calibration["capacity"] == capacity["prior"] >= 2 and calibration["within_bounds"]
    assert body["partial_every_ms"] == calibration["partial_every_ms"] == 500  # tiny.en keeps the asked cadence
    assert capacity["live"] >= 1 and capacity["refusing"] is None
    assert capacity["cost_per_speaker"]["partials"] > 0 and capacity["cost_per_speaker"]["finals"] > 0
    assert set(capacity["scale"]) == {"partials", "finals"}
    assert f"about {calibration['capacity']} speaker" in calibration["summary"]
    assert calibration["summary"] in live_server.log_text()  # said in one line at start-up
    assert calibration["seconds"] < 10  # the timing is short (tiny.en took 2-4 s here)


def test_a_push_to_talk_speaker_opens_its_next_socket_before_the_last_one_closes(tmp_path):
    """MAX_SESSIONS=1: the socket whose final went out no longer counts, so the same speaker's next
    socket is served; a second speaker while the first is under way is refused."""
    with start_server({**LIVE, "MAX_SESSIONS": "1"}, tmp_path) as server:

        async def scenario():
            async with websockets.connect(server.ws_url) as first:
                one = await speak(first, read_pcm(SHORT))
                async with websockets.connect(server.ws_url) as second:  # the first is still open
                    two = await speak(second, read_pcm(SHORT))
                    await second.send(read_pcm(SHORT)[:32000])  # the next utterance is under way
                    await asyncio.sleep(0.5)
                    async with websockets.connect(server.ws_url) as third:
                        code, reason = await refused(third)
            return one, two, code, reason

        one, two, code, reason = asyncio.run(scenario())
    assert one.final["text"] and two.final["text"] == one.final["text"]
    assert code == 1013 and "MAX_SESSIONS=1" in reason


def test_set_values_win_over_calibration(tmp_path):
    env = {"MAX_SESSIONS": "3", "MAX_BATCH": "2", "INFERENCE_WORKERS": "1", "PARTIAL_EVERY_MS": "700",
           "MAX_PARTIAL_LAG_SECONDS": "0", "ADMISSION": "fixed"}
    with start_server(env, tmp_path) as server:
        body = health(server)
    assert (body["max_sessions"], body["inference_workers"], body["partial_every_ms"]) == (3, 1, 700)
    assert body["max_partial_lag_s"] == 0  # admission by MAX_SESSIONS alone
    assert body["calibration"]["max_batch"] == 2 and body["calibration"]["workers"] == 1


def test_loading_the_model_leaves_numpy_one_blas_thread():
    # NumPy's BLAS threads spin after each call; with more than one they took the cores from every
    # encode that followed the features (README, "CPU threads").
    from threadpoolctl import threadpool_info

    from realtime_stt.model import load_model
    from realtime_stt.settings import Settings

    load_model(Settings(model_id=tiny_model_path()))
    threads = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert threads and set(threads) == {1}, threadpool_info()


def test_when_partials_stay_late_new_sockets_are_refused_until_they_catch_up(tmp_path):
    """A cadence no CPU keeps (every 50 ms) makes partials late at once and for as long as the
    speakers stream: the sustained lag, not the session count, refuses the next speaker; when the
    speakers stop, the server accepts again. So loaded, the sessions keep their partial windows at
    half WINDOW_SECONDS, for cheaper partials."""
    env = {"PARTIAL_EVERY_MS": "50", "MAX_SESSIONS": "16", "ADMISSION": "fixed"}
    with start_server(env, tmp_path) as server:

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
    assert during["capacity"]["refusing"] and "late" in during["capacity"]["refusing"]
    # Past the capacity the worker kept for finals takes partial batches too.
    assert during["inference_workers"] == 2 and during["inference"]["partial_batches_helped"] > 0, during
    assert code == 1013 and "late" in reason
    assert all(run.final["text"] for run in finals)  # the admitted are still served
    assert after["partial_lag_s"] <= 0.1
    # Windows slide at 3 s, not 6 s, and are read a decode later at most: none reached 5 s.
    assert windows["stt_partial_window_seconds_count"] >= 10
    assert windows["stt_partial_window_seconds_bucket{le=5.0}"] == windows["stt_partial_window_seconds_count"], windows
