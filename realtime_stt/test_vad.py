"""Speech activity as frames are scored."""

from __future__ import annotations

import numpy as np
import pytest

from realtime_stt.vad import VAD_FRAME, SpeechActivity, VadState, speech_probabilities


def test_speech_activity_tracks_the_last_speech_frame():
    speech = SpeechActivity(threshold=0.5)
    assert not speech.heard() and speech.trailing_silence() == 0.0
    speech.add(np.array([0.1, 0.2], dtype=np.float32))
    assert not speech.heard() and speech.silent_since(0)
    speech.add(np.array([0.9, 0.6, 0.3, 0.1, 0.2], dtype=np.float32))  # speech in frames 2 and 3
    assert speech.heard() and speech.scored_until == 7 * VAD_FRAME
    assert speech.trailing_silence() == pytest.approx(3 * VAD_FRAME / 16000)
    assert speech.silent_since(4 * VAD_FRAME) and not speech.silent_since(4 * VAD_FRAME - 1)
    speech.add(np.array([0.5], dtype=np.float32))  # the threshold itself counts as speech
    assert speech.trailing_silence() == 0.0 and not speech.silent_since(7 * VAD_FRAME)


def _speech_like(seconds: float, seed: int) -> np.ndarray:
    """Bursts of a voiced-like tone over noise, with pauses (Silero scores some frames high, some low)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    bursts = np.sin(2 * np.pi * (0.3 + 0.1 * seed) * t) > 0
    voice = np.sin(2 * np.pi * (140 + 20 * seed) * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * voice * bursts + 0.005 * rng.normal(size=t.size)).astype(np.float32)


def test_sessions_scored_together_in_rounds_get_the_probabilities_each_gets_alone():
    """The frontend scores every session's new audio in one worker-thread call a round; each
    session's probabilities are those of faster-whisper's pass over its whole audio, and its kept
    frames those of its features."""
    import asyncio

    from faster_whisper.feature_extractor import FeatureExtractor
    from faster_whisper.vad import get_vad_model

    from realtime_stt.features import MelFrames, window_features
    from realtime_stt.frontend import Frontend
    from realtime_stt.metrics import Metrics

    extractor = FeatureExtractor()
    audios = [_speech_like(4.0 + k, k) for k in range(4)]
    sessions = [(SpeechActivity(), MelFrames(extractor.mel_filters)) for _ in audios]
    metrics = Metrics()

    async def feed_all() -> None:
        frontend = Frontend(extractor.mel_filters, metrics.scoring_rounds)
        runner = asyncio.create_task(frontend.run())

        async def session(audio: np.ndarray, speech: SpeechActivity, mel: MelFrames) -> None:
            for end in range(1600, audio.size + 1600, 1600):  # 100 ms at a time, as clients send
                start = min(speech.scored_until, mel.needs_from())
                await frontend.listen(speech, mel, audio[start : min(end, audio.size)], start)

        await asyncio.gather(*(session(a, s, m) for a, (s, m) in zip(audios, sessions)))
        runner.cancel()

    asyncio.run(feed_all())
    rounds = metrics.registry.get_sample_value("stt_scoring_round_requests_count")
    assert metrics.registry.get_sample_value("stt_scoring_round_requests_sum") > rounds  # sessions did share rounds
    for audio, (speech, mel) in zip(audios, sessions):
        whole = audio[: audio.size // VAD_FRAME * VAD_FRAME]
        alone, _ = speech_probabilities(whole, VadState())  # the session scored by itself, in one call
        np.testing.assert_allclose(speech.scores(), alone, rtol=0, atol=1e-5)
        # faster-whisper's own pass zeroes the last 64 samples it reads (its context is a view of
        # the audio): every frame but the last agrees.
        np.testing.assert_allclose(speech.scores()[:-1], get_vad_model()(whole.copy()).reshape(-1)[:-1], rtol=0, atol=1e-5)
        # Its kept frames give its features: those of faster-whisper's extractor over its audio.
        window = audio[: audio.size // 160 * 160]
        np.testing.assert_allclose(window_features(mel.snapshot(), window, 0, [(0, window.size)], extractor.mel_filters),
                                   extractor(window)[:, :-1], rtol=0, atol=1e-5)


def test_a_windows_speech_from_the_streams_scores_is_faster_whispers_for_the_same_scores():
    from faster_whisper.vad import get_speech_timestamps, get_vad_model

    from realtime_stt.vad import VAD_OPTIONS, speech_spans

    for seed in range(4):
        audio = _speech_like(12.0, seed)
        scores = get_vad_model()(np.pad(audio, (0, VAD_FRAME - audio.size % VAD_FRAME))).reshape(-1)
        assert speech_spans(scores, 0, audio.size) == get_speech_timestamps(audio, VAD_OPTIONS)
    # Speech, a long stretch scored between the two thresholds (it neither starts nor ends speech),
    # speech again, then three seconds of silence (cut, each side padded by 400 ms), then speech.
    scores = np.array([0.0] * 20 + [0.9] * 20 + [0.4] * 70 + [0.9] * 5 + [0.0] * 94 + [0.9] * 10, dtype=np.float32)
    assert speech_spans(scores, 0, scores.size * VAD_FRAME) == [
        {"start": 20 * VAD_FRAME - 6400, "end": 115 * VAD_FRAME + 6400},
        {"start": 209 * VAD_FRAME - 6400, "end": 219 * VAD_FRAME},
    ]
    # A window that starts mid-utterance reads the frames from there, in its own samples.
    assert speech_spans(scores, 200 * VAD_FRAME, scores.size * VAD_FRAME) == [{"start": 0, "end": 19 * VAD_FRAME}]


def test_a_frame_below_the_speech_threshold_may_still_hold_speech():
    speech = SpeechActivity(threshold=0.35, sound_threshold=0.2)
    speech.add(np.array([0.9, 0.1, 0.25, 0.1, 0.05], dtype=np.float32))  # a soft word in frame 2
    assert speech.trailing_silence() == pytest.approx(4 * VAD_FRAME / 16000)
    assert speech.trailing_quiet() == pytest.approx(2 * VAD_FRAME / 16000)
    assert speech.silent_since(VAD_FRAME) and not speech.quiet_since(VAD_FRAME)
    assert speech.quiet_since(3 * VAD_FRAME) and not speech.quiet_since(3 * VAD_FRAME - 1)


def test_fast_falsetto_words_that_silero_scores_below_speech_are_not_quiet():
    """The last words of this recording score 0.2-0.3: a final decoded from before them lost them."""
    from pathlib import Path
    import wave

    from realtime_stt.vad import VadState, speech_probabilities

    path = Path(__file__).resolve().parents[2] / "shared" / "eval" / "en_mfa_style_falsetto2.wav"
    if not path.exists():
        pytest.skip(f"real speech not found at {path}")
    with wave.open(str(path)) as wav:
        audio = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
    speech = SpeechActivity()
    probabilities, _ = speech_probabilities(audio[: audio.size // VAD_FRAME * VAD_FRAME], VadState())
    speech.add(probabilities)
    before_last_words = int(2.0 * 16000)
    assert speech.silent_since(before_last_words)  # the speech threshold hears nothing after 2 s
    assert not speech.quiet_since(before_last_words)
    assert speech.quiet_since(int(2.9 * 16000))  # and the silence at the end is quiet
