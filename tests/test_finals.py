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


def test_a_streams_final_reads_the_vad_its_session_kept():
    """A stream's final takes its speech chunks from the scores its session kept (and its features
    from the kept frames) instead of running Silero over the whole utterance again."""
    from realtime_stt.decoder import Decoder
    from realtime_stt.frontend import Heard
    from realtime_stt.vad import VAD_FRAME, VadState, speech_probabilities

    decoder = Decoder(Settings(model_id=tiny_model_path(), cpu_threads=2))
    options = DecodeOptions("en", temperatures=(0.0, 0.2, 0.4, 0.6), offline=True, encoder=FINAL_ENCODER)
    speech = audio(SHORT)
    scores, _ = speech_probabilities(speech[: speech.size // VAD_FRAME * VAD_FRAME], VadState())
    own = decoder.decode_window(speech, options)
    kept = decoder.decode_window(speech, options, heard=Heard(0, scores, None))
    assert kept.text == own.text and wer(manifest()[SHORT]["text"], kept.text) <= 0.1, kept.text
    # Scores that hear no speech leave nothing to decode: the final read them, not its own VAD.
    assert decoder.decode_window(speech, options, heard=Heard(0, np.zeros_like(scores), None)).words == ()
