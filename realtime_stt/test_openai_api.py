"""The OpenAI-compatible API's pure parts: subtitle times."""

from __future__ import annotations

from realtime_stt.decoder import Segment
from realtime_stt.openai_api import srt, vtt


def segment(start: float, end: float, text: str) -> Segment:
    return Segment(1, 0, start, end, text, (), 0.0, -0.1, 1.2, 0.01)


def test_subtitles_number_their_cues_and_write_times_to_the_millisecond():
    cues = [segment(0.0, 2.5, " Ask not"), segment(3725.4567, 3727.0, " what your country")]
    assert srt(cues) == "1\n00:00:00,000 --> 00:00:02,500\nAsk not\n\n2\n01:02:05,457 --> 01:02:07,000\nwhat your country\n"
    assert vtt(cues) == "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nAsk not\n\n01:02:05.457 --> 01:02:07.000\nwhat your country\n"
