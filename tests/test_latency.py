"""Words on screen soon after they are spoken: a lone speaker gets partials faster than
PARTIAL_EVERY_MS while the model has time, faster still until an utterance's first words show, and
speech after a pause waits for no slow tick (the newest-word rule is pinned in
realtime_stt/test_policy.py); a lone speaker's audio is scored for speech as it comes, and under
load in pieces."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request

import pytest
import websockets
from conftest import metrics, read_pcm, speak, start_server, stream

SPEECH = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s, the first word at 0.2 s
SLOW, FAST = 2.0, 0.5  # seconds


@pytest.fixture(scope="module")
def slow_grid_server(tmp_path_factory):
    # A slow base cadence, so that a fast one is told from it by a wide margin on any machine that
    # can serve one tiny.en speaker.
    settings = {"PARTIAL_EVERY_MS": str(int(SLOW * 1000)), "FAST_PARTIAL_EVERY_MS": str(int(FAST * 1000))}
    with start_server(settings, tmp_path_factory.mktemp("fast")) as running:
        yield running


def has_time_for_fast_partials(server) -> bool:
    with urllib.request.urlopen(server.base_url + "/health") as response:
        capacity = json.load(response)["capacity"]
    # Fast partials cost SLOW / FAST times the partial work: the server takes them while that many
    # times its speakers fit the live capacity, or while one speaker alone has a partial that fits
    # the fast interval (a busy machine can measure either low).
    return capacity["live"] >= SLOW / FAST or capacity["partial_alone_s"] < FAST


def test_a_lone_speaker_gets_partials_faster_while_the_model_has_time(slow_grid_server):
    fast = has_time_for_fast_partials(slow_grid_server)

    async def session():
        async with websockets.connect(slow_grid_server.ws_url) as ws:
            return await speak(ws, read_pcm(SPEECH), config={"language": "en"}, realtime=1.0)

    result = asyncio.run(session())
    arrivals = [t for t, m in result.messages if m["type"] == "partial" and t <= result.stop_sent]
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(intervals) >= 2, intervals
    assert (statistics.median(intervals) < (SLOW + FAST) / 2) == fast, intervals
    assert result.partials[-1]["text"] and result.final["text"]


def test_speech_after_a_pause_is_decoded_on_the_fast_grid_not_at_the_next_slow_tick(slow_grid_server):
    fast = has_time_for_fast_partials(slow_grid_server)

    async def session() -> float:
        async with websockets.connect(slow_grid_server.ws_url) as ws:
            await ws.send(json.dumps({"language": "en"}))
            # Silence in real time until a partial comes: that is a point of the slow grid.
            first = asyncio.ensure_future(ws.recv())
            while not first.done():
                await ws.send(bytes(3200))
                await asyncio.wait([first], timeout=0.1)
            slow_tick = time.monotonic()
            speaking = asyncio.create_task(stream(ws, read_pcm(SPEECH)[: 3 * 32000]))
            assert json.loads(await ws.recv())["type"] == "partial"
            waited = time.monotonic() - slow_tick
            await speaking
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "final":
                pass
            return waited

    waited = asyncio.run(session())
    # Fast: the speech is heard by about 0.5 s, the next fast point and its decode follow.
    assert (waited < SLOW - 0.4) == fast, waited


@pytest.fixture(scope="module")
def first_words_server(tmp_path_factory):
    # The fast grid off, so that only the first words' grid can make partials come sooner than SLOW.
    settings = {"PARTIAL_EVERY_MS": str(int(SLOW * 1000)), "FAST_PARTIAL_EVERY_MS": "0", "FIRST_PARTIAL_EVERY_MS": str(int(FAST * 1000))}
    with start_server(settings, tmp_path_factory.mktemp("first")) as running:
        yield running


def test_until_the_first_words_show_partials_come_on_the_first_words_grid(first_words_server):
    fast = has_time_for_fast_partials(first_words_server)  # the same ratio: SLOW / FAST

    async def session():
        async with websockets.connect(first_words_server.ws_url) as ws:
            return await speak(ws, read_pcm(SPEECH), config={"language": "en"}, realtime=1.0)

    result = asyncio.run(session())
    partials = [(t, m) for t, m in result.messages if m["type"] == "partial" and t <= result.stop_sent]
    shown = next(i for i, (_, m) in enumerate(partials) if m["text"])
    before = [t for t, _ in partials[: shown + 1]]  # up to and with the first text
    after = [t for t, _ in partials[shown:]]
    assert len(after) >= 2, after
    # Once a word shows, the slow grid again; before, the first words' grid, where the model has time.
    assert statistics.median(b - a for a, b in zip(after, after[1:])) > (SLOW + FAST) / 2
    if fast:
        assert len(before) >= 2 and max(b - a for a, b in zip(before, before[1:])) < (SLOW + FAST) / 2, before
    else:
        assert all(b - a > (SLOW + FAST) / 2 for a, b in zip(before, before[1:])), before


def test_a_lone_speakers_audio_is_scored_as_it_comes_and_with_others_streaming_in_pieces(server):
    """Alone, each 100 ms message is scored for speech as it comes (its pause, its speculative final
    noticed at once). While others stream, audio is scored once 0.3 s waits or a partial reads it:
    fewer requests to the frontend's rounds for the same audio, and the same finals."""
    pcm = read_pcm(SPEECH)
    messages = len(range(0, len(pcm), 3200))

    async def speakers(count: int) -> list:
        async def one():
            async with websockets.connect(server.ws_url) as ws:
                return await speak(ws, pcm, config={"language": "en"}, realtime=1.0)

        return await asyncio.gather(*(one() for _ in range(count)))

    def requests_per_message(count: int) -> tuple[float, list]:
        before = metrics(server)["stt_scoring_round_requests_sum"]
        runs = asyncio.run(speakers(count))
        return (metrics(server)["stt_scoring_round_requests_sum"] - before) / (count * messages), runs

    alone, [run] = requests_per_message(1)
    shared, runs = requests_per_message(3)
    assert alone >= 0.6, alone
    assert shared <= 0.7 * alone, (shared, alone)
    assert {r.final["text"] for r in runs} == {run.final["text"]}, [r.final for r in [run, *runs]]
