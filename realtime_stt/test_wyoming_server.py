"""The Wyoming adapter's pure parts: audio of any format to 16 kHz mono int16, and the bounded
event reader (on a real asyncio StreamReader, fed as a socket would feed it)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from realtime_stt.wyoming_server import (
    MAX_PAYLOAD_BYTES,
    AudioFormat,
    BadInput,
    Converter,
    read_event,
    samples_of,
)


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def encode(samples: np.ndarray, width: int) -> bytes:
    if width == 1:
        return np.clip(np.round(samples * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    scaled = np.round(samples.astype(np.float64) * 2 ** (8 * width - 1)).astype("<i8")
    if width == 3:
        return scaled.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return scaled.astype({2: "<i2", 4: "<i4"}[width]).tobytes()


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_width_reads_back(width):
    samples = np.array([-0.5, -0.25, 0.0, 0.25, 0.5, -1.0], np.float32)
    assert np.allclose(samples_of(encode(samples, width), width), samples, atol=1 / 127)


def dominant_hz(pcm: bytes, rate: int = 16000) -> float:
    samples = np.frombuffer(pcm, "<i2").astype(np.float32)
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate / samples.size)


@pytest.mark.parametrize(("rate", "width", "channels"), [(8000, 2, 2), (44100, 3, 1), (48000, 4, 6), (22050, 1, 1)])
def test_any_format_becomes_16khz_mono_int16_in_chunks(rate, width, channels):
    mono = tone(rate, 1.0)
    frames = np.repeat(mono[:, None], channels, axis=1).reshape(-1)
    data = encode(frames, width)
    converter = Converter(AudioFormat(rate, width, channels))
    # Chunks that end inside a frame, as a client may cut them.
    out = b"".join(converter.convert(data[i : i + 1001]) for i in range(0, len(data), 1001))
    out += converter.convert(b"", last=True)
    assert abs(len(out) // 2 - 16000) <= 2  # one second, at 16 kHz
    assert abs(dominant_hz(out) - 440) <= 2
    middle = np.frombuffer(out, "<i2")[2000:14000] / 32768
    assert 0.45 < np.abs(middle).max() < 0.55  # the level kept, channels averaged


def test_stereo_channels_are_averaged():
    left, right = np.full(160, 0.5, np.float32), np.full(160, -0.25, np.float32)
    data = encode(np.stack([left, right], axis=1).reshape(-1), 2)
    out = np.frombuffer(Converter(AudioFormat(16000, 2, 2)).convert(data), "<i2") / 32768
    assert np.allclose(out, 0.125, atol=1e-4)


def test_the_pipelines_own_format_passes_unchanged():
    data = bytes(range(256)) * 10 + b"\x01"  # a split sample is the pipeline's to keep
    assert Converter(AudioFormat(16000, 2, 1)).convert(data) == data


@pytest.mark.parametrize("data", [{"rate": 16000, "width": 2}, {"rate": 0, "width": 2, "channels": 1},
                                  {"rate": 16000, "width": 5, "channels": 1}, {"rate": 16000, "width": 2, "channels": 0},
                                  {"rate": "16000", "width": 2, "channels": 1}])
def test_odd_formats_are_refused(data):
    with pytest.raises(BadInput):
        AudioFormat.of(data)


def read(raw: bytes):
    async def go():
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_event(reader)

    return asyncio.run(go())


def test_events_with_data_and_payload_are_read():
    data = json.dumps({"width": 2, "channels": 1}).encode()
    header = {"type": "audio-chunk", "data": {"rate": 16000}, "data_length": len(data), "payload_length": 4}
    event = read(json.dumps(header).encode() + b"\n" + data + b"\x01\x02\x03\x04")
    assert (event.type, event.data, event.payload) == ("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02\x03\x04")
    assert read(b"") is None and read(b'{"type": "describe"}') is None  # the stream ended


@pytest.mark.parametrize(("raw", "code"), [
    (b"not json\n", "bad_event"),
    (b"[1, 2]\n", "bad_event"),
    (b'{"data": {}}\n', "bad_event"),
    (b'{"type": "x", "data": 3}\n', "bad_event"),
    (b'{"type": "x", "payload_length": -1}\n', "bad_event"),
    (b'{"type": "x", "payload_length": %d}\n' % (MAX_PAYLOAD_BYTES + 1), "too_big"),
    (b'{"type": "x", "data_length": 5}\nhello', "bad_event"),
    (b'{"type": "' + b"x" * 2000 + b'"}\n', "too_big"),
    (b"\xff\xfe\n", "bad_event"),
])
def test_malformed_events_are_refused(raw, code):
    with pytest.raises(BadInput) as refused:
        read(raw)
    assert refused.value.code == code
