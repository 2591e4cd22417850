"""The core scenarios with DEVICE=cuda, where CTranslate2 sees a GPU; skipped everywhere else (the
CI machine has none). Run on a GPU machine with the same command as the rest of the suite."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import ctranslate2
import pytest
import websockets
from conftest import manifest, read_pcm, speak, start_server, wer

pytestmark = pytest.mark.skipif(ctranslate2.get_cuda_device_count() == 0, reason="no GPU that CTranslate2 can use")

SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"
SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"
THIRD = "en_librispeech_dev-clean_1272-141231-0002.wav"


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    # INFERENCE_WORKERS unset: calibration picks the layout on the card.
    with start_server({"DEVICE": "cuda", "COMPUTE_TYPE": "float16", "INFERENCE_WORKERS": "", "ADMISSION": "live"}, tmp_path_factory.mktemp("gpu")) as running:
        yield running


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
        return json.loads(response.read())


def test_calibration_on_the_gpu_uses_one_worker_and_batches(gpu_server):
    body = health(gpu_server)
    assert body["device"] == "cuda" and body["inference_workers"] == 1
    calibration = body["calibration"]
    assert calibration["within_bounds"] and calibration["capacity"] >= 8
    assert body["max_sessions"] == body["capacity"]["live"] and body["accepting"]


def test_realtime_speech_and_several_clients_on_the_gpu(gpu_server):
    async def one(name):
        async with websockets.connect(gpu_server.ws_url) as ws:
            return await speak(ws, read_pcm(name), realtime=1.0)

    async def scenario():
        return await asyncio.gather(*(one(name) for name in (SPEECH, SHORT, THIRD)))

    results = asyncio.run(scenario())
    for name, result in zip((SPEECH, SHORT, THIRD), results):
        assert len(result.partials) >= 4
        assert wer(manifest()[name]["text"], result.final["text"]) <= 0.2, result.final
    assert health(gpu_server)["inference"]["largest_batch"] >= 2
