"""Words on screen soon after they are spoken: a lone speaker gets partials faster than
PARTIAL_EVERY_MS while the model has time (the newest-word rule is pinned in realtime_stt/test_policy.py)."""

from __future__ import annotations

import asyncio
import json
import statistics
import urllib.request

import pytest
import websockets
from conftest import read_pcm, speak, start_server

SPEECH = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s


@pytest.fixture(scope="module")
def slow_grid_server(tmp_path_factory):
    # A slow base cadence, so that a fast one is told from it by a wide margin on any machine that
    # can serve one tiny.en speaker.
    with start_server({"PARTIAL_EVERY_MS": "1000", "FAST_PARTIAL_EVERY_MS": "250"}, tmp_path_factory.mktemp("fast")) as running:
        yield running


def test_a_lone_speaker_gets_partials_faster_while_the_model_has_time(slow_grid_server):
    with urllib.request.urlopen(slow_grid_server.base_url + "/health") as response:
        capacity = json.load(response)["calibration"]["capacity"]
    # Fast partials cost four times the partial work here: the server takes them only while four
    # times its speakers fit the capacity it calibrated (a busy machine can calibrate low).
    fast = capacity >= 4
    async def session():
        async with websockets.connect(slow_grid_server.ws_url) as ws:
            return await speak(ws, read_pcm(SPEECH), config={"language": "en"}, realtime=1.0)

    result = asyncio.run(session())
    arrivals = [t for t, m in result.messages if m["type"] == "partial" and t <= result.stop_sent]
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(intervals) >= 4, intervals
    assert (statistics.median(intervals) < 0.75) == fast, (capacity, intervals)
    assert result.partials[-1]["text"] and result.final["text"]
