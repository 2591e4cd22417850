"""OpenAI's Realtime transcription API on a real server (tiny.en, real speech) with real clients: the
official `openai` SDK (GA and beta sessions) and the Agents SDK's OpenAISTTModel, unchanged, pointed
at the server by base URL. Deltas while the speaker talks, server VAD's turns, the client's commits,
the final against the seed protocol's, bad events, the key, capacity and the drain."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import urllib.request

import numpy as np
import pytest
import soxr
import websockets
from conftest import manifest, metrics, read_pcm, speak, start_server, wer
from openai import AsyncOpenAI
from openai.types.realtime import (
    RealtimeTranscriptionSessionCreateRequest,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)

from bench.metrics import error_rate, units

KEY = "realtime-key"
FIRST = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s
SECOND = "en_cmu_goforward.wav"  # 2.8 s
# The seed protocol's final and this API's on the same files: 106 words.
PARITY = (FIRST, "en_librispeech_dev-clean_1272-141231-0002.wav", "en_librispeech_dev-clean_2412-153948-0000.wav",
          "en_librivox_sense_and_sensibility_0870.wav")
TRANSCRIBE_EN = {"model": "gpt-4o-transcribe", "language": "en"}
ERROR_FIELDS = {"type", "code", "message", "param", "event_id"}


@pytest.fixture(scope="module")
def realtime(tmp_path_factory):
    manifest()
    # A fixed cap of two, and a partial every 500 ms: a loaded machine's calibration may measure one
    # speaker and a partial every 2.5 s, and a 5.9 s turn would then commit no word while it lasts.
    env = {"API_KEY": KEY, "MAX_SESSIONS": "2", "ADMISSION": "fixed", "PARTIAL_EVERY_MS": "500", "MAX_PARTIAL_LAG_SECONDS": "0"}
    with start_server(env, tmp_path_factory.mktemp("realtime")) as server:
        yield server


def client(server, key: str = KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def connect(server, key: str = KEY):
    return client(server, key).realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"})


def at_24k(pcm: bytes) -> np.ndarray:
    return soxr.resample(np.frombuffer(pcm, "<i2"), 16_000, 24_000).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(24_000 * seconds), dtype=np.int16)


def reference(name: str) -> str:
    return manifest()[name]["text"]


def session_update(turn_detection) -> dict:
    return {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                         "transcription": TRANSCRIBE_EN, "turn_detection": turn_detection}}}


async def append_all(conn, audio: np.ndarray, speed: float = 0.0, chunk: int = 2400) -> float:
    """Append 24 kHz audio in 100 ms events, paced by the clock at ``speed`` times real time (0: at
    once); returns when the first was sent."""
    start = time.monotonic()
    for index, offset in enumerate(range(0, audio.size, chunk)):
        if speed:
            await asyncio.sleep(max(0.0, start + index * chunk / 24_000 / speed - time.monotonic()))
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio[offset : offset + chunk].tobytes()).decode())
    return start


async def events_until(conn, completions: int, seen: list) -> None:
    """Every server event with its arrival time, until ``completions`` transcripts are complete."""
    async for event in conn:
        seen.append((time.monotonic(), event))
        assert event.type != "error", event
        if event.type == "conversation.item.input_audio_transcription.completed":
            completions -= 1
            if not completions:
                return


def test_deltas_come_while_the_speaker_talks_and_server_vad_ends_each_turn(realtime):
    """Two utterances with a pause, streamed in real time: two items, each with its speech events,
    commit, item, deltas of committed words while the speaker still talks, and the final."""
    audio = np.concatenate([at_24k(read_pcm(FIRST)), silence(1.5), at_24k(read_pcm(SECOND)), silence(1.0)])
    first_seconds = manifest()[FIRST]["duration_s"]
    seen: list = []

    async def scenario() -> float:
        async with connect(realtime) as conn:
            created = await conn.recv()
            assert isinstance(created, SessionCreatedEvent)
            assert isinstance(created.session, RealtimeTranscriptionSessionCreateRequest) and created.session.type == "transcription"
            await conn.session.update(session=session_update({"type": "server_vad", "threshold": 0.5,
                                                              "prefix_padding_ms": 300, "silence_duration_ms": 500}))
            answer = await conn.recv()
            assert isinstance(answer, SessionUpdatedEvent) and answer.session.audio.input.turn_detection.silence_duration_ms == 500
            receiver = asyncio.create_task(events_until(conn, 2, seen))
            start = await append_all(conn, audio, speed=1.0)
            await asyncio.wait_for(receiver, 60)
            return start

    start = asyncio.run(scenario())
    items = [e.item_id for _, e in seen if e.type == "input_audio_buffer.committed"]
    assert len(items) == 2 and len(set(items)) == 2
    kinds = {item: [e.type.rsplit(".", 1)[-1] for _, e in seen if getattr(e, "item_id", None) == item
                    or getattr(getattr(e, "item", None), "id", None) == item] for item in items}
    for item in items:
        order = [k for k in kinds[item] if k != "delta"]
        assert order == ["speech_started", "speech_stopped", "committed", "created", "completed"], kinds[item]
        deltas_at = [index for index, kind in enumerate(kinds[item]) if kind == "delta"]
        assert all(kinds[item].index("speech_started") < index < kinds[item].index("committed") for index in deltas_at)
    assert "delta" in kinds[items[0]]  # the second, under 3 s, may end before two decodes agree on a word
    created = [e for _, e in seen if e.type == "conversation.item.created"]
    assert created[0].previous_item_id is None and created[1].previous_item_id == items[0]
    starts = [e.audio_start_ms for _, e in seen if e.type == "input_audio_buffer.speech_started"]
    stops = [e.audio_end_ms for _, e in seen if e.type == "input_audio_buffer.speech_stopped"]
    # Each start includes the 300 ms of prefix padding; the second speaker begins after the 1.5 s pause.
    assert starts[0] < 1000 < first_seconds * 1000 < stops[0] < starts[1] < stops[1]
    assert starts[1] >= (first_seconds + 1.5) * 1000 - 300 - 64  # within two VAD frames
    # The first words come while the first speaker still talks (its 5.9 s are not yet all sent).
    first_delta = next(t for t, e in seen if e.type.endswith(".delta") and e.item_id == items[0])
    assert first_delta < start + first_seconds, first_delta - start
    for index, (item, name) in enumerate(zip(items, (FIRST, SECOND))):
        deltas = [e.delta for _, e in seen if e.type.endswith(".delta") and e.item_id == item]
        final = next(e for _, e in seen if e.type.endswith(".completed") and e.item_id == item)
        # Only committed words, whole: joined, they read as text, and for the 5.9 s speaker as the
        # final's first words (tiny.en's committed words and its final decode of the whole utterance
        # may differ by a word, which in the 2.8 s one's few words weighs too much to judge).
        assert all(deltas) and all(d.startswith(" ") for d in deltas[1:]), deltas
        said = units("".join(deltas), "en")
        if index == 0:
            assert error_rate([(" ".join(units(final.transcript, "en")[: len(said)]), " ".join(said), "en")]) <= 0.3
        assert wer(reference(name), final.transcript) <= 0.25, final.transcript
        assert final.usage.type == "duration" and final.usage.seconds > 2


def test_a_commit_and_a_clear_first_take_the_turns_server_vad_ended_before_them(realtime):
    """Two utterances in one append, then a commit and a clear at once, as the Agents SDK ends its
    input: each utterance is its own item, committed before the clear, however far the VAD lags."""
    audio = np.concatenate([at_24k(read_pcm(FIRST)), silence(1.5), at_24k(read_pcm(SECOND)), silence(1.0)])

    async def scenario() -> list:
        seen = []
        async with connect(realtime) as conn:
            await conn.recv()
            await conn.session.update(session=session_update({"type": "server_vad"}))
            await conn.recv()
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio.tobytes()).decode())
            await conn.input_audio_buffer.commit()
            await conn.input_audio_buffer.clear()
            async for event in conn:
                seen.append(event)
                if event.type == "input_audio_buffer.cleared":
                    return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert not [e for e in seen if e.type == "error"], seen
    said = [e.transcript for e in seen if e.type.endswith(".completed") and e.transcript]
    assert len(said) == 2 and wer(reference(FIRST), said[0]) <= 0.25 and wer(reference(SECOND), said[1]) <= 0.25, said
    assert len([e for e in seen if e.type == "input_audio_buffer.speech_stopped"]) == 2


def test_without_turn_detection_the_turn_waits_for_the_commit_and_its_final_is_the_seed_protocols(realtime):
    async def seed_final(pcm: bytes) -> str:
        async with websockets.connect(realtime.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            # The same audio as the other arm: the speech, then a second of silence.
            return (await speak(ws, pcm + bytes(32_000), config={"language": "en"})).final["text"]

    async def realtime_final(pcm: bytes, wait: float) -> str:
        async with connect(realtime) as conn:
            await conn.recv()
            await conn.session.update(session=session_update(None))
            assert (await conn.recv()).session.audio.input.turn_detection is None
            seen: list = []
            receiver = asyncio.create_task(events_until(conn, 1, seen))
            await append_all(conn, np.concatenate([at_24k(pcm), silence(1.0)]))
            await asyncio.sleep(wait)
            assert not receiver.done() and not [e for _, e in seen if e.type == "input_audio_buffer.committed"], seen
            await conn.input_audio_buffer.commit()
            await asyncio.wait_for(receiver, 60)
            return seen[-1][1].transcript

    async def scenario() -> list[tuple[str, str, str]]:
        rows = []
        for index, name in enumerate(PARITY):
            pcm = read_pcm(name)
            rows.append((name, await seed_final(pcm), await realtime_final(pcm, 2.0 if index == 0 else 0.0)))
        return rows

    rows = asyncio.run(scenario())
    seed = error_rate([(reference(name), text, "en") for name, text, _ in rows])
    ours = error_rate([(reference(name), text, "en") for name, _, text in rows])
    assert abs(ours - seed) <= 0.005, rows


def test_a_beta_client_gets_beta_events_and_its_g711_is_transcribed(realtime):
    """The SDK's beta client (OpenAI-Beta: realtime=v1): transcription_session events, mu-law audio."""
    # The client's side: 8 kHz, then G.711 mu-law (bias 0x84, clipped at 32635; sign, segment, mantissa, inverted).
    mu_law = soxr.resample(np.frombuffer(read_pcm(SECOND), "<i2"), 16_000, 8_000).astype(np.int16)
    exponent = np.clip(np.floor(np.log2(np.abs(mu_law.astype(np.int32)) + 0x84)) - 7, 0, 7).astype(np.int32)
    magnitude = np.minimum(np.abs(mu_law.astype(np.int32)), 32635) + 0x84
    code = ~((np.where(mu_law < 0, 0x80, 0) | (exponent << 4) | ((magnitude >> (exponent + 3)) & 0x0F))) & 0xFF

    async def scenario() -> tuple[list[str], str]:
        beta = AsyncOpenAI(base_url=f"{realtime.base_url}/v1", api_key=KEY, max_retries=0,
                           websocket_base_url=realtime.ws_url[:-3].replace("http", "ws") + "/v1")
        async with beta.beta.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
            kinds = [(await conn.recv()).type]
            await conn.transcription_session.update(session={
                "input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": None})
            updated = await conn.recv()
            kinds.append(updated.type)
            assert updated.session.input_audio_format == "g711_ulaw" and updated.session.turn_detection is None
            await conn.input_audio_buffer.append(audio=base64.b64encode(code.astype(np.uint8).tobytes()).decode())
            await conn.input_audio_buffer.commit()
            async for event in conn:
                assert event.type != "error", event
                if event.type == "conversation.item.input_audio_transcription.completed":
                    return kinds, event.transcript

    kinds, transcript = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert kinds == ["transcription_session.created", "transcription_session.updated"]
    assert wer(reference(SECOND), transcript) <= 0.25, transcript


def test_the_agents_sdk_transcribes_each_turn(realtime):
    """openai-agents' streamed STT as it ships: its default semantic VAD (served as server VAD), its
    wait for session.updated, its end-of-input commit and clear."""
    from agents import set_tracing_disabled
    from agents.voice import OpenAISTTModel, StreamedAudioInput, STTModelSettings

    set_tracing_disabled(True)
    audio = np.concatenate([at_24k(read_pcm(FIRST)), silence(2.0), at_24k(read_pcm(SECOND)), silence(2.0)])

    async def scenario() -> list[str]:
        model = OpenAISTTModel("gpt-4o-transcribe", client(realtime))
        spoken = StreamedAudioInput()
        session = await model.create_session(spoken, STTModelSettings(language="en"), False, False)
        for offset in range(0, audio.size, 4800):
            await spoken.add_audio(audio[offset : offset + 4800])
        await spoken.add_audio(None)
        return [turn async for turn in session.transcribe_turns()]

    turns = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert len(turns) == 2, turns
    assert wer(reference(FIRST), turns[0]) <= 0.25 and wer(reference(SECOND), turns[1]) <= 0.25, turns


def test_bad_events_get_openais_error_events_and_the_session_goes_on(realtime):
    bad = [
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ({"type": "response.create"}, "invalid_event_type", "type"),
        ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.append"}, "invalid_value", "audio"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "unsupported_session_type", "session.type"),
        ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": {
            "type": "server_vad", "threshold": 2}}}}}, "invalid_value", "session.audio.input.turn_detection.server_vad.threshold"),
        ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"transcription": {
            "language": "de"}}}}}, "invalid_value", "session.audio.input.transcription.language"),
        ({"type": "input_audio_buffer.commit", "event_id": "evt_empty"}, "input_audio_buffer_commit_empty", None),
        (b"\x00\x01", "invalid_event", None),
    ]

    async def scenario() -> tuple[list[dict], str]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with websockets.connect(f"{realtime.ws_url[:-3]}/v1/realtime?intent=transcription", additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            errors = []
            for message, _, _ in bad:
                await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
                errors.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await ws.send(json.dumps({"type": "session.update", "session": session_update(None)}))
            assert json.loads(await ws.recv())["type"] == "session.updated"
            audio = base64.b64encode(at_24k(read_pcm(SECOND)).tobytes()).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            done = "conversation.item.input_audio_transcription.completed"
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != done:
                assert event["type"] != "error", event
            return errors, event["transcript"]

    errors, transcript = asyncio.run(scenario())
    for (message, code, param), event in zip(bad, errors):
        assert event["type"] == "error" and set(event["error"]) == ERROR_FIELDS, event
        assert (event["error"]["code"], event["error"]["param"]) == (code, param), (message, event)
    assert errors[-2]["error"]["event_id"] == "evt_empty"  # as the Agents SDK matches its final commit
    assert wer(reference(SECOND), transcript) <= 0.25


def test_the_key_and_the_origin_are_checked(realtime):
    async def close_code(**kwargs) -> int:
        url = f"{realtime.ws_url[:-3]}/v1/realtime?intent=transcription"
        async with websockets.connect(url, **kwargs) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code

    async def with_the_sdk(key: str) -> int:
        async with connect(realtime, key) as conn:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(conn.recv(), 10)
            return closed.value.rcvd.code

    assert asyncio.run(with_the_sdk("wrong-key")) == 1008
    assert asyncio.run(close_code()) == 1008
    headers = {"Authorization": f"Bearer {KEY}", "Origin": "https://elsewhere.example"}
    assert asyncio.run(close_code(additional_headers=headers)) == 1008


def test_sessions_past_capacity_are_refused_with_1013(realtime):
    def sessions() -> int:
        with urllib.request.urlopen(realtime.base_url + "/health", timeout=5) as response:
            return json.loads(response.read())["sessions"]

    deadline = time.monotonic() + 10
    while sessions() and time.monotonic() < deadline:  # the tests before have closed theirs
        time.sleep(0.1)

    async def scenario() -> int:
        async with connect(realtime) as one, connect(realtime) as two:
            await one.recv()
            await two.recv()
            async with connect(realtime) as three:
                with pytest.raises(websockets.ConnectionClosed) as refused:
                    await asyncio.wait_for(three.recv(), 10)
                return refused.value.rcvd.code

    assert asyncio.run(scenario()) == 1013


def test_with_server_vad_audio_is_scored_as_it_comes_while_others_stream(realtime):
    """A turn ends on the VAD's scores: while another session streams, each 100 ms of a server-VAD
    session's audio is still scored as it comes, not in the pieces a seed-protocol session waits
    for under load (tests/test_latency.py), so its speech_stopped and its final come no later."""
    audio = np.concatenate([at_24k(read_pcm(FIRST)), silence(1.0)])
    appends = len(range(0, audio.size, 2400))

    async def session() -> None:
        async with connect(realtime) as conn:
            await conn.recv()
            await conn.session.update(session=session_update({"type": "server_vad", "silence_duration_ms": 500}))
            await conn.recv()
            receiver = asyncio.create_task(events_until(conn, 1, []))
            await append_all(conn, audio, speed=1.0)
            await asyncio.wait_for(receiver, 60)

    async def both() -> None:
        await asyncio.gather(session(), session())

    before = metrics(realtime, KEY)["stt_scoring_round_requests_sum"]
    asyncio.run(both())
    scored = (metrics(realtime, KEY)["stt_scoring_round_requests_sum"] - before) / (2 * appends)
    assert scored >= 0.75, scored


def test_a_restart_sends_the_final_of_the_turn_under_way_then_1012(realtime):
    """Last in this file: it stops the module's server."""

    async def scenario() -> tuple[list, int]:
        seen: list = []
        async with connect(realtime) as conn:
            await conn.recv()
            await conn.session.update(session=session_update(None))
            await conn.recv()
            await append_all(conn, at_24k(read_pcm(FIRST)))
            realtime.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(events_until(conn, 2, seen), 60)
            return seen, closed.value.rcvd.code

    seen, code = asyncio.run(scenario())
    finals = [e.transcript for _, e in seen if e.type.endswith(".completed")]
    assert code == 1012 and len(finals) == 1 and wer(reference(FIRST), finals[0]) <= 0.25, seen
