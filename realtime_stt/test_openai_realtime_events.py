"""The pure parts of the Realtime API: G.711 against the standard library's own decoder, the streaming
resampler, how session updates merge, and server VAD's turns over Silero scores."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from realtime_stt.openai_realtime_events import (
    G711,
    AudioDecoder,
    BetaUpdate,
    GaUpdate,
    SessionConfig,
    TurnDetector,
    Vad,
    beta_session,
    error_event,
    ga_session,
    updated,
)


def test_g711_decodes_every_byte_as_the_standard_library_does():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # gone from Python 3.13
    every = bytes(range(256))
    assert (np.frombuffer(audioop.ulaw2lin(every, 2), "<i2") == G711["g711_ulaw"]).all()
    assert (np.frombuffer(audioop.alaw2lin(every, 2), "<i2") == G711["g711_alaw"]).all()


@pytest.mark.parametrize(("audio_format", "rate", "width"), [("pcm16", 24_000, 2), ("g711_ulaw", 8_000, 1)])
def test_a_second_of_any_format_is_a_second_at_16_khz_whatever_the_chunks(audio_format, rate, width):
    decoder = AudioDecoder(audio_format)
    data = np.zeros(rate * width, dtype=np.uint8).tobytes() if width == 1 else (np.arange(rate, dtype=np.int16) % 200).tobytes()
    chunks = [data[i : i + 1001] for i in range(0, len(data), 1001)]  # odd sizes: PCM16 splits samples
    total = sum(decoder.decode(chunk).size for chunk in chunks) + decoder.flush().size
    assert abs(total - 16_000) <= 1


def test_an_update_changes_what_it_names_and_keeps_the_rest():
    config = SessionConfig(model="tiny.en", language="en", prompt="words")
    ga = GaUpdate.model_validate({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-4o-transcribe"}}}}})
    after = updated(config, ga)
    assert (after.format, after.model, after.language, after.prompt) == ("g711_ulaw", "gpt-4o-transcribe", "en", "words")
    assert after.vad == Vad()
    off = updated(after, GaUpdate.model_validate(
        {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}}))
    assert off.vad is None and off.format == "g711_ulaw"
    semantic = updated(off, BetaUpdate.model_validate({"type": "transcription_session.update", "session": {
        "input_audio_format": "pcm16", "turn_detection": {"type": "semantic_vad", "eagerness": "low"},
        "input_audio_transcription": {"languages": ["de"]}}}))
    assert semantic.vad == Vad(silence_duration_ms=1200, asked="semantic_vad") and semantic.language == "de"
    assert ga_session(semantic, "sess_1")["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # as served
    assert beta_session(semantic, "sess_1")["input_audio_format"] == "pcm16"


def test_server_vad_starts_on_the_threshold_and_stops_after_the_silence():
    detector = TurnDetector(Vad(threshold=0.5, silence_duration_ms=500))  # 16 frames of 32 ms
    scores = np.array([0.1] * 10 + [0.9] * 20 + [0.4] * 5 + [0.1] * 16 + [0.9] * 5, dtype=np.float32)
    events = detector.add(0, scores[:12]) + detector.add(12, scores[12:])
    # 0.4 is under the threshold but within the release: still speech; the stop ends the turn.
    assert events == [("started", 10), ("stopped", 51)]
    assert detector.over and detector.heard and detector.add(56, scores[:20]) == []
    detector.reset()
    assert detector.add(0, np.array([0.3] * 40, dtype=np.float32)) == [] and not detector.heard


def test_an_error_event_has_openais_fields():
    event = error_event("bad", "invalid_value", "session.type", "evt_1")
    assert event["type"] == "error" and event["event_id"].startswith("event_")
    assert event["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": "bad",
                              "param": "session.type", "event_id": "evt_1"}
