"""The final's decode made ahead of the stop, on the real engine and model: a decode voided by later
speech stops between its steps, and the worker kept for finals goes on taking the next ones."""

from __future__ import annotations

import asyncio
import wave

import numpy as np
import pytest
from conftest import EVAL_DIR, manifest, tiny_model_path, wer

from realtime_stt.decoder import FINAL_ENCODER, DecodeOptions
from realtime_stt.engine import PRIORITY_FINAL, PRIORITY_SPECULATIVE, Engine
from realtime_stt.metrics import Metrics
from realtime_stt.settings import Settings

SHORT = "en_librispeech_dev-clean_1272-128104-0000.wav"  # 5.9 s


def audio(name: str) -> np.ndarray:
    manifest()
    with wave.open(str(EVAL_DIR / name)) as file:
        return np.frombuffer(file.readframes(file.getnframes()), dtype="<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def engine():
    # Two workers, as calibration chooses on a CPU with two threads: speculation goes to the one kept for finals.
    settings = Settings(model_id=tiny_model_path(), cpu_threads=2, inference_workers=2)
    return Engine(settings, Metrics())


def test_a_voided_speculative_final_stops_and_the_next_one_runs(engine):
    options = DecodeOptions("en", temperatures=(0.0, 0.2, 0.4, 0.6), offline=True, encoder=FINAL_ENCODER)
    speech = audio(SHORT)

    async def scenario():
        await engine.start()
        try:
            speaker = object()
            voided = engine.submit(speech, options, priority=PRIORITY_SPECULATIVE, is_stale=lambda: False,
                                   requester=speaker, voided=lambda: True)
            assert await asyncio.wait_for(voided.future, 60) is None and voided.started
            kept = engine.submit(speech, options, priority=PRIORITY_SPECULATIVE, is_stale=lambda: False,
                                 requester=speaker, voided=lambda: False)
            final = await asyncio.wait_for(engine.transcribe(speech, options, priority=PRIORITY_FINAL), 60)
            return await asyncio.wait_for(kept.future, 60), final
        finally:
            await engine.close()

    kept, final = asyncio.run(scenario())
    assert kept is not None and kept.text == final.text
    assert wer(manifest()[SHORT]["text"], final.text) <= 0.1, final.text


def test_a_streams_final_reads_the_vad_its_session_kept(monkeypatch):
    """A stream's final takes its speech chunks from the scores its session kept instead of running
    Silero over the whole utterance again."""
    from faster_whisper import WhisperModel

    from realtime_stt.decoder import Decoder
    from realtime_stt.features import MelFrames
    from realtime_stt.frontend import Frontend, Heard
    from realtime_stt.vad import SpeechActivity

    decoder = Decoder(Settings(model_id=tiny_model_path(), cpu_threads=2))
    options = DecodeOptions("en", temperatures=(0.0, 0.2, 0.4, 0.6), offline=True, encoder=FINAL_ENCODER)
    speech = audio(SHORT)
    activity, mel = SpeechActivity(), MelFrames(decoder.model.feature_extractor.mel_filters)

    async def stream() -> None:  # as a session keeps them: 100 ms at a time, scored in the frontend's rounds
        frontend = Frontend(decoder.model.feature_extractor.mel_filters, Metrics().scoring_rounds)
        runner = asyncio.create_task(frontend.run())
        for end in range(1600, speech.size + 1600, 1600):
            start = min(activity.scored_until, mel.needs_from())
            await frontend.listen(activity, mel, speech[start : min(end, speech.size)], start)
        runner.cancel()

    asyncio.run(stream())
    scores = activity.scores()
    own = decoder.decode_window(speech, options)
    encodes, encode = [], WhisperModel.encode
    monkeypatch.setattr(WhisperModel, "encode", lambda model, features: encodes.append(features.shape) or encode(model, features))
    kept = decoder.decode_window(speech, options, heard=Heard(0, scores, None))
    # Its encoder runs once: transcribe is handed that output for the same features.
    assert len(encodes) == 1, encodes
    assert kept.text == own.text and wer(manifest()[SHORT]["text"], kept.text) <= 0.1, kept.text
    # Scores that hear no speech leave nothing to decode: the final read them, not its own VAD.
    assert decoder.decode_window(speech, options, heard=Heard(0, np.zeros_like(scores), None)).words == ()
