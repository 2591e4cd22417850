"""The Wyoming server (Home Assistant's Assist) with the `wyoming` package's own AsyncTcpClient
against a real server (tiny.en, real speech): describe, transcripts as accurate as /ws's finals on
the same server, transcript chunks while the audio still arrives, 8 kHz stereo input, a malformed
event refused while another client is served, the capacity refusal, and the drain."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import numpy as np
import pytest
import soxr
import websockets
from conftest import free_port, manifest, read_pcm, speak, start_server, wer
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.info import Describe, Info

SHORT = ("en_cmu_goforward.wav", "en_librivox_sense_and_sensibility_0880.wav", "en_libritts_test-clean_260_horizon.wav",
         "en_mfa_style_thoughts.wav")  # 2.8 to 5.0 s
LONGER = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s
SAMPLES_PER_CHUNK = 1024  # what Home Assistant sends


@pytest.fixture(scope="module")
def wyoming(tmp_path_factory):
    """One server for the module: MAX_SESSIONS=1 for the capacity refusal (the tests run one
    session at a time), admission by MAX_SESSIONS alone on a loaded machine."""
    manifest()
    port = free_port()
    env = {"WYOMING_PORT": str(port), "MAX_SESSIONS": "1", "MAX_PARTIAL_LAG_SECONDS": "0"}
    with start_server(env, tmp_path_factory.mktemp("wyoming")) as server:
        yield server, port


@pytest.fixture
def idle(wyoming):
    """The server with no session open: a client's close reaches the server a moment after the
    client has its answer, and MAX_SESSIONS=1 would refuse the next test's session meanwhile."""
    server, port = wyoming
    deadline = time.monotonic() + 20
    while health(server)["sessions"]:
        assert time.monotonic() < deadline, "a session stayed open"
        time.sleep(0.05)
    return server, port


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
        return json.loads(response.read())


def client(port: int) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", port, connect_timeout=10, read_timeout=120)


async def send_audio(conn, pcm: bytes, *, rate: int = 16000, width: int = 2, channels: int = 1, realtime: bool = False) -> float:
    """audio-start, the chunks (paced by the clock at real time if asked), audio-stop; when the stop went."""
    await conn.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = SAMPLES_PER_CHUNK * width * channels
    start = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        if realtime:
            await asyncio.sleep(max(0.0, start + index * SAMPLES_PER_CHUNK / rate - time.monotonic()))
        await conn.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=pcm[offset : offset + step]).event())
    await conn.write_event(AudioStop().event())
    return time.monotonic()


async def events_until_stop(conn) -> list[tuple[float, object]]:
    """(arrival time, event) up to and with transcript-stop."""
    events = []
    while True:
        event = await conn.read_event()
        assert event is not None, f"connection closed after {events}"
        events.append((time.monotonic(), event))
        assert not Error.is_type(event.type), event
        if TranscriptStop.is_type(event.type):
            return events


async def utterance(conn, pcm: bytes, language: str | None = "en", **audio) -> tuple[float, list[tuple[float, object]]]:
    await conn.write_event(Transcribe(language=language).event())
    reading = asyncio.create_task(events_until_stop(conn))
    stop_sent = await send_audio(conn, pcm, **audio)
    return stop_sent, await reading


def final_of(events) -> Transcript:
    kinds = [event.type for _, event in events]
    assert kinds[0] == "transcript-start" and kinds[-2:] == ["transcript", "transcript-stop"], kinds
    assert set(kinds[1:-2]) <= {"transcript-chunk"}, kinds
    return Transcript.from_event(events[-2][1])


def test_describe_names_the_model_and_its_languages(idle):
    server, port = idle

    async def go():
        async with client(port) as conn:
            await conn.write_event(Describe().event())
            return Info.from_event(await conn.read_event())

    info = asyncio.run(go())
    (program,) = info.asr
    (model,) = program.models
    assert program.supports_transcript_streaming and program.installed and model.installed
    assert model.languages == health(server)["languages"] == ["en"]
    assert model.name == health(server)["model"] and model.version and model.attribution.url


def test_transcripts_are_as_accurate_as_the_websocket_finals(idle):
    server, port = idle
    rows = manifest()

    async def go():
        over_ws, over_wyoming = [], []
        for name in SHORT:
            async with websockets.connect(server.ws_url) as ws:
                over_ws.append((await speak(ws, read_pcm(name))).final["text"])
        async with client(port) as conn:  # several utterances, one after the other, on one connection
            for name in SHORT:
                _, events = await utterance(conn, read_pcm(name))
                final = final_of(events)
                assert final.language == "en"
                over_wyoming.append(final.text)
        return over_ws, over_wyoming

    over_ws, over_wyoming = asyncio.run(go())
    references = " ".join(rows[name]["text"] for name in SHORT)
    ws_wer, wyoming_wer = wer(references, " ".join(over_ws)), wer(references, " ".join(over_wyoming))
    print(f"WER over /ws {ws_wer:.3%}, over Wyoming {wyoming_wer:.3%}")
    assert abs(wyoming_wer - ws_wer) <= 0.005, (over_ws, over_wyoming)


def test_chunks_arrive_while_the_audio_still_does(idle):
    _, port = idle

    async def go():
        async with client(port) as conn:
            return await utterance(conn, read_pcm(LONGER), realtime=True)

    stop_sent, events = asyncio.run(go())
    final = final_of(events)
    chunks = [(at, TranscriptChunk.from_event(event).text) for at, event in events if TranscriptChunk.is_type(event.type)]
    early = "".join(text for at, text in chunks if at < stop_sent)
    assert early.strip(), f"no chunk before audio-stop: {events}"
    assert TranscriptStart.from_event(events[0][1]).language == "en"
    # Chunks carry committed words only: together they are words the final has too.
    assert wer(final.text, "".join(text for _, text in chunks)) < 0.5, (chunks, final.text)
    assert wer(manifest()[LONGER]["text"], final.text) < 0.2


def test_8khz_stereo_and_other_formats_are_converted(idle):
    _, port = idle
    mono = np.frombuffer(read_pcm(LONGER), "<i2").astype(np.float32) / 32768
    low = soxr.resample(mono, 16000, 8000)
    stereo = np.stack([low, 0.5 * low], axis=1).reshape(-1)  # interleaved, the second channel quieter
    pcm = np.clip(np.round(stereo * 32768), -32768, 32767).astype("<i2").tobytes()
    # 44.1 kHz 24-bit mono too: 8 kHz stereo has as many values a second as 16 kHz mono, so a
    # server that took the bytes as they come would read it at the right speed.
    high = np.round(soxr.resample(mono, 16000, 44100) * 2**23).astype("<i4")
    pcm24 = high.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()

    async def go():
        async with client(port) as conn:
            _, stereo_events = await utterance(conn, pcm, rate=8000, channels=2)
            _, wide_events = await utterance(conn, pcm24, rate=44100, width=3)
            return final_of(stereo_events).text, final_of(wide_events).text

    texts = asyncio.run(go())
    assert all(wer(manifest()[LONGER]["text"], text) < 0.2 for text in texts), texts


async def refused(conn) -> Error:
    """The error a refused client gets, then the end of its connection."""
    event = await conn.read_event()
    assert event is not None and Error.is_type(event.type), event
    assert await conn.read_event() is None  # closed
    return Error.from_event(event)


def test_a_malformed_event_is_refused_while_another_client_is_served(idle):
    _, port = idle

    async def go():
        async with client(port) as speaker:
            served = asyncio.create_task(utterance(speaker, read_pcm(LONGER), realtime=True))
            await asyncio.sleep(1.0)  # the speaker is under way
            errors = []
            for raw in (b"this is not json\n", b'{"type": "audio-chunk", "payload_length": 1000000000}\n'):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 10)
                header = json.loads(line)
                data = json.loads(await reader.readexactly(header["data_length"]))
                assert header["type"] == "error" and await reader.read() == b"", (header, data)  # then closed
                errors.append(data)
                writer.close()
            async with client(port) as odd:  # a valid header with an audio format no one can use
                await odd.write_event(AudioChunk(rate=16000, width=7, channels=1, audio=b"\0" * 14).event())
                errors.append((await refused(odd)).to_dict())
            return errors, await served

    errors, (_, events) = asyncio.run(go())
    assert [e["code"] for e in errors] == ["bad_event", "too_big", "bad_audio"], errors
    assert "not valid JSON" in errors[0]["text"] and "limit" in errors[1]["text"]
    assert wer(manifest()[LONGER]["text"], final_of(events).text) < 0.2  # the speaker was served on


def test_past_capacity_a_client_gets_the_reason_then_a_close(idle):
    server, port = idle

    async def go():
        async with client(port) as first:
            await first.write_event(Transcribe(language="en").event())
            await first.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await first.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=read_pcm(SHORT[0])).event())
            async with client(port) as second:
                await second.write_event(Describe().event())  # answered even when full: it is no session
                assert Info.is_type((await second.read_event()).type)
                await second.write_event(Transcribe(language="en").event())
                error = await refused(second)
            await first.write_event(AudioStop().event())
            return error, final_of(await events_until_stop(first))

    error, final = asyncio.run(go())
    assert error.code == "busy" and "MAX_SESSIONS=1" in error.text, error
    assert wer(manifest()[SHORT[0]]["text"], final.text) < 0.2  # the first speaker was served on


def test_a_drain_sends_the_final_of_the_utterance_under_way(tmp_path):
    """SIGTERM mid-utterance: the transcript of the audio so far, then an error saying why, then the
    close. A server of its own: the drain ends it."""
    manifest()
    port = free_port()
    with start_server({"WYOMING_PORT": str(port), "DRAIN_SECONDS": "30"}, tmp_path) as server:

        async def go():
            async with client(port) as conn:
                await conn.write_event(Transcribe(language="en").event())
                await conn.write_event(AudioStart(rate=16000, width=2, channels=1).event())
                pcm = read_pcm(LONGER)
                for offset in range(0, len(pcm), 2048):
                    await conn.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm[offset : offset + 2048]).event())
                await asyncio.sleep(0.5)  # the chunks are in
                server.process.send_signal(signal.SIGTERM)
                events = await events_until_stop(conn)
                return events, await refused(conn)

        events, error = asyncio.run(go())
        assert wer(manifest()[LONGER]["text"], final_of(events).text) < 0.2
        assert error.code == "restart"
        assert server.process.wait(timeout=30) == -signal.SIGTERM  # uvicorn ends with the signal it handled
        assert "Traceback" not in server.log_text()
