"""The server end to end: real uvicorn, real tiny.en model, real speech, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import websockets
from conftest import ROOT, manifest, read_pcm, speak, start_server, tiny_model_path, wer

SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"  # 11.7 s, LibriSpeech transcript
SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s

THIRD = "en_librispeech_dev-clean_1272-141231-0002.wav"  # 13.3 s
JFK = "en_jfk_inaugural_1961.wav"  # 11.0 s
# Four recordings back to back, 41.9 s: past Whisper's 30 s window, yet short enough to decode in
# minutes on a starved CI machine (the 158 s long-form file took 16 minutes there).
LONG = (SPEECH, SHORT, THIRD, JFK)

# WER of plain offline faster-whisper (tiny.en, whole file, VAD, greedy) on these files, measured
# here; a streamed final may miss by at most WER_MARGIN more (about one word in ten).
OFFLINE_WER = {SPEECH: 0.0, SHORT: 0.0, THIRD: 0.129, LONG: 0.038}
WER_MARGIN = 0.10
WER_BOUND = WER_MARGIN  # for the files tiny.en transcribes exactly offline


def normalize(text: str) -> str:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()(text)


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
        return json.loads(response.read())


async def until_idle(server) -> None:
    """With MAX_SESSIONS=1 a new socket must wait until the server has seen the last one close."""
    for _ in range(100):
        if (await asyncio.to_thread(health, server))["sessions"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("a closed session is still counted")


def run(coroutine):
    return asyncio.run(coroutine)


async def one_utterance(url: str, name: str, **kwargs):
    async with websockets.connect(url) as ws:
        return await speak(ws, read_pcm(name), **kwargs)


async def expect_error(ws, message: str | bytes) -> str:
    await ws.send(message)
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["type"] == "error", reply
    return reply["message"]


async def expect_close(ws) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(1000):
            await asyncio.wait_for(ws.recv(), 30)
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_health_reports_model_device_and_compute_type(server):
    body = health(server)
    assert body["status"] == "ok"
    assert body["model"] == tiny_model_path()
    assert body["device"] == "cpu"
    assert body["compute_type"] == "int8_float32"
    assert body["languages"] == ["en"] and body["can_translate"] is False
    # CPU_THREADS=2: calibration chose one worker with both threads or two with one each.
    assert body["inference_workers"] == body["calibration"]["workers"] in (1, 2)


def test_realtime_speech_gets_partials_then_an_accurate_final(server):
    reference = manifest()[SPEECH]["text"]
    result = run(one_utterance(server.ws_url, SPEECH, config={"language": "en", "beam_size": 1}, realtime=1.0))
    partials = result.partials
    assert len(partials) >= 8, "an 11.7 s utterance should bring a partial about every 500 ms"
    assert all(p["text"] for p in partials[-5:])
    # Committed text is append-only within an utterance.
    for before, after in zip(partials, partials[1:]):
        assert after["committed"].startswith(before["committed"]), (before, after)
    assert wer(reference, partials[-1]["text"]) < 0.3, partials[-1]
    final = result.final
    assert wer(reference, final["text"]) <= WER_BOUND, final
    assert final["duration_s"] == pytest.approx(11.66, abs=0.01)
    assert final["language"] == "en"
    # The final (a fresh decode of the whole utterance) agrees with what the user already saw
    # committed, case and punctuation aside, but for at most one word in ten.
    committed = normalize(partials[-1]["committed"])
    final_head = " ".join(normalize(final["text"]).split()[: len(committed.split())])
    assert committed and wer(committed, final_head) <= 0.1, (committed, final_head)


def test_two_utterances_on_one_connection_and_an_empty_stop(server):
    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            empty = await speak(ws, b"")
            first = await speak(ws, read_pcm(SHORT), config={"language": "en"})
            second = await speak(ws, read_pcm(SPEECH))
            return empty, first, second

    empty, first, second = run(scenario())
    assert empty.final["text"] == "" and empty.partials == []
    assert wer(manifest()[SHORT]["text"], first.final["text"]) <= WER_BOUND
    assert wer(manifest()[SPEECH]["text"], second.final["text"]) <= WER_BOUND
    assert "Quilter" not in second.final["text"], "the second utterance must not carry the first one's words"


def test_frames_split_mid_sample_lose_nothing(server):
    pcm = read_pcm(SHORT)
    odd = run(one_utterance(server.ws_url, SHORT, frame_bytes=3201))
    even = run(one_utterance(server.ws_url, SHORT, frame_bytes=3200))
    assert odd.final["text"] == even.final["text"]
    assert odd.final["duration_s"] == pytest.approx(len(pcm) / 32000, abs=1e-3)


def test_several_clients_at_once(server):
    names = [SPEECH, SHORT, THIRD]

    async def scenario():
        return await asyncio.gather(*(one_utterance(server.ws_url, n, realtime=1.0) for n in names))

    before = health(server)["inference"]
    results = run(scenario())
    after = health(server)["inference"]
    # The sessions' partials share decodes: fewer model calls than partial decodes.
    assert after["largest_batch"] >= 2
    assert after["batches"] - before["batches"] < after["decodes"] - before["decodes"]
    for name, result in zip(names, results):
        assert result.partials, name
        assert wer(manifest()[name]["text"], result.final["text"]) <= OFFLINE_WER[name] + WER_MARGIN, result.final


def silence(seconds: float) -> bytes:
    return bytes(2 * int(seconds * 16000))


class Speaker:
    """A client that streams like a push-to-talk app: speech, then silence in real time until the
    key is let go, collecting every message it gets."""

    def __init__(self, ws, server) -> None:
        self.ws, self.server, self.sent, self.messages = ws, server, 0, []
        self._receiver = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            self.messages.append(json.loads(await self.ws.recv()))
            if self.messages[-1]["type"] == "final":
                return

    async def send(self, pcm: bytes) -> None:
        await self.ws.send(pcm)
        self.sent += len(pcm)

    async def hold_until(self, counter: str, above: int, timeout: float = 90.0) -> None:
        """Stream silence, 100 ms a frame in real time, until /health's inference[counter] > above."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (await asyncio.to_thread(health, self.server))["inference"][counter] <= above:
            assert loop.time() < deadline, f"{counter} stayed at {above} through {timeout} s of silence"
            await self.send(silence(0.1))
            await asyncio.sleep(0.1)

    async def stop(self) -> dict:
        await self.ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(self._receiver, 120)
        return self.messages[-1]


def counters(server) -> dict:
    return health(server)["inference"]


def test_a_pause_before_the_stop_has_the_final_ready(server):
    """The final's decode starts in the pause before the stop; speech after the pause voids it."""

    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            speaker = Speaker(ws, server)
            await speaker.send(read_pcm(SHORT))
            await speaker.hold_until("speculative_runs", counters(server)["speculative_runs"])
            return await speaker.stop()

    before = counters(server)
    final = run(scenario())
    after = counters(server)
    assert after["speculative_finals"] == before["speculative_finals"] + 1, (before, after)
    assert wer(manifest()[SHORT]["text"], final["text"]) <= WER_BOUND, final

    async def resumed():
        async with websockets.connect(server.ws_url) as ws:
            speaker = Speaker(ws, server)
            await speaker.send(read_pcm(SHORT))
            await speaker.hold_until("speculative_runs", counters(server)["speculative_runs"])
            await speaker.send(read_pcm(SPEECH))  # the speaker goes on after the pause
            return await speaker.stop(), speaker.sent

    final, sent = run(resumed())
    assert counters(server)["speculative_finals"] == after["speculative_finals"], "a voided decode was used"
    both = manifest()[SHORT]["text"] + " " + manifest()[SPEECH]["text"]
    assert wer(both, final["text"]) <= WER_BOUND, final
    assert final["duration_s"] == pytest.approx(sent / 32000, abs=0.001)


def test_the_final_starts_when_the_speech_stops_not_after_a_pause(server):
    """A push-to-talk key comes up 0.2-0.5 s after the last word: the final's decode starts once the
    VAD hears the speech stop (0.1 s of silence here), not after the 0.2 s pause that slows partials."""
    cut = 2 * int(3.0 * 16000)  # mid-sentence: Silero hears speech up to the last frame (0.98)

    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            speaker = Speaker(ws, server)
            await speaker.send(read_pcm(SHORT)[:cut])
            await asyncio.sleep(3.0)  # the partial decodes are over, and the model idle for 3 s
            runs = counters(server)["speculative_runs"]
            await speaker.send(silence(0.15))  # nothing after it: no later audio can start one
            for _ in range(100):
                if (await asyncio.to_thread(counters, server))["speculative_runs"] > runs:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("no decode of the final started within 10 s of the speech stopping")
            return await speaker.stop()

    before = counters(server)
    final = run(scenario())
    assert counters(server)["speculative_finals"] == before["speculative_finals"] + 1
    assert normalize(final["text"]).startswith("mister quilter"), final


def test_what_is_said_after_a_short_pause_reaches_the_final(server):
    """A final decoded without timestamps may stop at a pause; what follows must still be read."""
    tails = ("en_librivox_sense_and_sensibility_0880.wav", "en_mfa_style_thoughts.wav")

    async def one(tail: str) -> dict:
        async with websockets.connect(server.ws_url) as ws:
            return (await speak(ws, read_pcm(SHORT) + silence(0.6) + read_pcm(tail) + silence(0.3), realtime=1.0)).final

    async def scenario():  # two speakers at once, as two at once are served (test_several_clients_at_once)
        return await asyncio.gather(*map(one, tails))

    for tail, final in zip(tails, run(scenario())):
        # Each tail is 8 of the 24 words: losing it costs 0.33; tiny.en misspells a word of the first.
        assert wer(manifest()[SHORT]["text"] + " " + manifest()[tail]["text"], final["text"]) <= 0.2, final


def test_silence_brings_partials_without_decodes(server):
    """Once a decode has come after the speaker stopped, more silence resends the partial undecoded."""

    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            speaker = Speaker(ws, server)
            pcm = read_pcm(SHORT)
            for start in range(0, len(pcm), 8000):  # 0.25 s frames in real time
                await speaker.send(pcm[start : start + 8000])
                await asyncio.sleep(0.25)
            await speaker.hold_until("decodes_skipped", counters(server)["decodes_skipped"])
            first_skip, partials = counters(server), len(speaker.messages)
            await speaker.hold_until("decodes_skipped", first_skip["decodes_skipped"] + 3)
            return first_skip, counters(server), speaker.messages[partials:], await speaker.stop()

    first_skip, later, partials, final = run(scenario())
    partial_decodes = [c["decodes"] - c["speculative_runs"] for c in (first_skip, later)]
    assert partial_decodes[0] == partial_decodes[1], "silence was decoded again"
    assert len(partials) >= 3 and len({p["text"] for p in partials}) == 1, partials
    assert partials[0]["text"] != ""
    assert wer(manifest()[SHORT]["text"], final["text"]) <= WER_BOUND, final


def test_utterance_longer_than_30_seconds(server):
    pcm = b"".join(map(read_pcm, LONG))

    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            return await speak(ws, pcm, realtime=8.0, frame_bytes=16000)

    result = run(scenario())
    text = result.final["text"]
    # All four must come back whole, not one window's worth (the last one starts at 30.9 s).
    assert len(text.split()) > 90 and "fellow americans" in text.lower(), text
    assert wer(" ".join(manifest()[name]["text"] for name in LONG), text) <= OFFLINE_WER[LONG] + WER_MARGIN, text
    assert result.final["duration_s"] == pytest.approx(len(pcm) / 32000, abs=1e-3)


def test_bad_messages_get_errors_and_the_session_goes_on(server):
    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            problems = [
                await expect_error(ws, "{not json"),
                await expect_error(ws, "[1, 2]"),
                await expect_error(ws, json.dumps({"type": "dance"})),
                await expect_error(ws, json.dumps({"language": "en", "temperature": 0.3})),
                await expect_error(ws, json.dumps({"beam_size": 11})),
                await expect_error(ws, json.dumps({"beam_size": 0})),
                await expect_error(ws, json.dumps({"task": "summarize"})),
                await expect_error(ws, json.dumps({"language": "de"})),
                await expect_error(ws, json.dumps({"language": "klingon"})),
                await expect_error(ws, json.dumps({"task": "translate"})),
                await expect_error(ws, json.dumps({"type": "stop", "now": True})),
            ]
            await ws.send(read_pcm(SHORT)[:32000])
            problems.append(await expect_error(ws, json.dumps({"language": "en"})))
            await ws.send(json.dumps({"type": "stop"}))
            while (message := json.loads(await ws.recv()))["type"] != "final":
                pass
            after = await speak(ws, read_pcm(SHORT))
            return problems, after

    problems, after = run(scenario())
    assert problems[0].startswith("invalid JSON")
    assert "JSON object" in problems[1]
    assert "unknown message type 'dance'" in problems[2]
    assert "temperature" in problems[3]
    assert "beam_size" in problems[4] and "beam_size" in problems[5]
    assert "task" in problems[6]
    assert "unsupported language 'de'" in problems[7] and "en" in problems[7]
    assert "klingon" in problems[8]
    assert "cannot translate" in problems[9] and "English-only" in problems[9]
    assert "now" in problems[10]
    assert "before the audio" in problems[11]
    assert wer(manifest()[SHORT]["text"], after.final["text"]) <= WER_BOUND


def test_client_that_vanishes_mid_decode_leaves_nothing_behind(server):
    async def vanish():
        ws = await websockets.connect(server.ws_url)
        await ws.send(read_pcm(SPEECH))
        await ws.send(json.dumps({"type": "stop"}))
        await ws.close()  # gone while the final decode is queued or running

    async def vanish_mid_stream():
        ws = await websockets.connect(server.ws_url)
        for start in range(0, 64000, 3200):
            await ws.send(read_pcm(SPEECH)[start : start + 3200])
            await asyncio.sleep(0.05)
        ws.transport.abort()  # no close handshake at all

    async def scenario():
        await vanish()
        await vanish_mid_stream()
        await asyncio.sleep(1.0)
        return await one_utterance(server.ws_url, SHORT)

    after = run(scenario())
    assert wer(manifest()[SHORT]["text"], after.final["text"]) <= WER_BOUND
    # The close handshake can end on the client a moment before the server's session has let go.
    deadline = time.monotonic() + 5
    while (open_now := health(server)["sessions"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_now == 0
    assert "Traceback" not in server.log_text()


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    env = {"API_KEY": "s3cret", "MAX_SESSIONS": "1", "MAX_UTTERANCE_SECONDS": "3"}
    with start_server(env, tmp_path_factory.mktemp("strict")) as running:
        yield running


def test_api_key_is_required_when_set(strict_server):
    async def scenario():
        async with websockets.connect(strict_server.ws_url) as ws:
            missing = await expect_close(ws)
        async with websockets.connect(strict_server.ws_url + "?token=wrong") as ws:
            wrong = await expect_close(ws)
        async with websockets.connect(strict_server.ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            header = await speak(ws, read_pcm(SHORT)[:64000])
        await until_idle(strict_server)
        async with websockets.connect(strict_server.ws_url + "?token=s3cret") as ws:
            query = await speak(ws, read_pcm(SHORT)[:64000])
        return missing, wrong, header, query

    missing, wrong, header, query = run(scenario())
    assert missing[0] == wrong[0] == 1008 and "API key" in missing[1]
    assert header.final["text"] and header.final["text"] == query.final["text"]


def test_utterance_over_the_length_limit_closes_with_1009(strict_server):
    async def scenario():
        await until_idle(strict_server)
        async with websockets.connect(strict_server.ws_url + "?token=s3cret") as ws:
            await ws.send(read_pcm(SPEECH)[: 4 * 32000])
            return await expect_close(ws)

    code, reason = run(scenario())
    assert code == 1009 and "MAX_UTTERANCE_SECONDS=3" in reason


def test_more_sessions_than_allowed_closes_with_1013(strict_server):
    async def scenario():
        url = strict_server.ws_url + "?token=s3cret"
        await until_idle(strict_server)
        async with websockets.connect(url) as first:
            await first.send(json.dumps({"language": "en"}))
            async with websockets.connect(url) as second:
                refused = await expect_close(second)
            still = await speak(first, read_pcm(SHORT)[:64000])
        return refused, still

    (code, reason), still = run(scenario())
    assert code == 1013 and "try again later" in reason
    assert still.final["text"], "the session already in place keeps being served"


def test_metrics_are_behind_the_api_key(strict_server):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(strict_server.base_url + "/metrics", timeout=5)
    assert refused.value.code == 401
    request = urllib.request.Request(strict_server.base_url + "/metrics", headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200 and b"stt_sessions_open" in response.read()


def test_pages_from_other_origins_are_refused(server):
    async def scenario():
        async with websockets.connect(server.ws_url, origin="https://evil.example") as ws:
            refused = await expect_close(ws)
        async with websockets.connect(server.ws_url, origin="http://localhost:5173") as ws:
            allowed = await speak(ws, b"")
        return refused, allowed

    (code, reason), allowed = run(scenario())
    assert code == 1008 and "evil.example" in reason and "ALLOWED_ORIGINS" in reason
    assert allowed.final["text"] == ""


def start_and_fail(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_start_up_with_a_model_that_does_not_exist_says_how_to_fix_it():
    result = start_and_fail({"MODEL_ID": "/nowhere/whisper-model", "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "MODEL_ID='/nowhere/whisper-model': no such directory" in result.stderr
    assert "local CTranslate2 Whisper directory" in result.stderr


def test_start_up_with_a_bad_setting_names_the_variable_in_one_line():
    result = start_and_fail({"WINDOW_SECONDS": "six"})
    assert result.returncode != 0
    assert result.stderr.strip() == "error: WINDOW_SECONDS='six' is not a valid float; use a value from 1 to 30"


def test_start_up_without_the_hub_points_to_a_local_directory():
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ID"}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "MODEL_ID='large-v3-turbo' could not be loaded" in result.stderr
    assert "local CTranslate2 Whisper directory" in result.stderr
