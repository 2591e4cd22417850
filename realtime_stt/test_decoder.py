"""What the encoder sees of a partial window (pure: no model is loaded)."""

from __future__ import annotations

from realtime_stt.decoder import BUSY_PARTIAL_ENCODER, N_FRAMES, PARTIAL_ENCODER


def test_a_partial_window_is_encoded_with_ten_seconds_of_padding_not_padded_to_fifteen():
    assert PARTIAL_ENCODER.width(150) == 1150  # 1.5 s of audio: + 10 s, not 15 s in all
    assert PARTIAL_ENCODER.width(500) == 1500
    assert PARTIAL_ENCODER.width(40) == 1040
    assert PARTIAL_ENCODER.width(2500) == N_FRAMES  # never past Whisper's 30 s
    assert PARTIAL_ENCODER.width(151) == 1152  # an even number of frames
    # Under load, a window of at most half WINDOW_SECONDS (3 s): 5 s of padding, 8 s at least.
    assert BUSY_PARTIAL_ENCODER.width(200) == 800 and BUSY_PARTIAL_ENCODER.width(300) == 800
    assert BUSY_PARTIAL_ENCODER.width(600) == 1100


def test_a_final_of_one_window_is_encoded_with_ten_seconds_of_padding_fifteen_at_least():
    from realtime_stt.decoder import FINAL_ENCODER

    assert FINAL_ENCODER.width(200) == 1500  # a 2 s utterance: 15 s in all, not 30 s
    assert FINAL_ENCODER.width(800) == 1800  # 8 s: + 10 s
    assert FINAL_ENCODER.width(2100) == N_FRAMES  # never past Whisper's 30 s
