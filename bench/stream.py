"""Clients that stream files over real WebSockets, paced like speech, recording every message: over the
seed protocol at /ws, or over OpenAI's Realtime API at /v1/realtime (``--protocol realtime``)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.data import Item, read_pcm
from bench.server import Server

logger = logging.getLogger("bench")

FRAME_SECONDS = 0.1
REFUSED = "refused: "  # an error that is the server's 1013 at the door, not a dropped session


@dataclass
class Utterance:
    """What one client saw for one file: every message with its arrival time."""

    item: Item
    first_audio: float = 0.0
    stop_sent: float = 0.0
    messages: list[tuple[float, dict]] = field(default_factory=list)
    error: str | None = None

    def of_type(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.messages if m.get("type") == kind]

    @property
    def final(self) -> dict | None:
        finals = self.of_type("final")
        return finals[0][1] if finals else None


async def stream_file(ws, item: Item, speed: float, auto_language: bool = False) -> Utterance:
    """One file over the seed protocol: a config, binary 16 kHz PCM frames, then a stop."""
    config = {"task": "transcribe", "beam_size": 1} if auto_language else {"language": item.language, "task": "transcribe", "beam_size": 1}
    utterance = Utterance(item)

    def received(message: dict) -> bool:
        utterance.messages.append((time.monotonic(), message))
        return message.get("type") == "final"

    frame = int(16000 * FRAME_SECONDS) * 2
    pcm = _spoken(item)
    frames = [pcm[offset : offset + frame] for offset in range(0, len(pcm), frame)]
    await _speak(ws, utterance, speed, [json.dumps(config)], frames, len(pcm) / 32000, json.dumps({"type": "stop"}), received)
    return utterance


async def stream_file_realtime(ws, item: Item, speed: float, auto_language: bool = False) -> Utterance:
    """The same over OpenAI's Realtime API (/v1/realtime): 24 kHz PCM appended 100 ms at a time with
    no turn detection, committed at the end. Its deltas of committed words are counted as partials
    (committed and shown alike: the API shows no tentative words) and its completed transcript as
    the final, so that every figure reads the same as the seed protocol's."""
    import numpy as np
    import soxr

    transcription = {"model": "whisper-1"} if auto_language else {"model": "whisper-1", "language": item.language}
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "transcription": transcription, "turn_detection": None}}}
    utterance, said = Utterance(item), [""]

    def received(event: dict) -> bool:
        now, kind = time.monotonic(), event.get("type", "")
        if kind == "conversation.item.input_audio_transcription.delta":
            said[0] += event["delta"]
            utterance.messages.append((now, {"type": "partial", "text": said[0], "committed": said[0]}))
        elif kind == "conversation.item.input_audio_transcription.completed":
            utterance.messages.append((now, {"type": "final", "text": event["transcript"]}))
            return True
        elif kind == "error":
            utterance.messages.append((now, {"type": "error", "message": event["error"]["message"]}))
        return False

    pcm = soxr.resample(np.frombuffer(_spoken(item), "<i2"), 16000, 24000).astype(np.int16).tobytes()
    seconds = len(pcm) / 48000
    frame = int(24000 * FRAME_SECONDS) * 2
    frames = [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[offset : offset + frame]).decode()})
              for offset in range(0, len(pcm), frame)]
    await _speak(ws, utterance, speed, [json.dumps({"type": "session.update", "session": session})], frames, seconds,
                 json.dumps({"type": "input_audio_buffer.commit"}), received)
    return utterance


def _spoken(item: Item) -> bytes:
    """The file's 16 kHz PCM up to the stop: its end, or for push-to-talk (``item.stop_s``) a set time
    after its last word, cut there or padded with silence past the file's end."""
    pcm = read_pcm(item.path)
    if item.stop_s is None:
        return pcm
    size = int(item.stop_s * 16000) * 2
    return pcm[:size].ljust(size, b"\0")


async def _speak(ws, utterance: Utterance, speed: float, first: list[str], frames: list, seconds: float, stop: str,
                 received: Callable[[dict], bool]) -> None:
    """Send ``first``, then ``frames`` of FRAME_SECONDS paced like speech (``seconds`` in all), then
    ``stop``; every message goes to ``received`` until it says the final came."""

    async def receive() -> None:
        while not received(json.loads(await ws.recv())):
            pass

    receiver = asyncio.create_task(receive())
    try:
        for message in first:
            await ws.send(message)
        start = utterance.first_audio = time.monotonic()
        for index, frame in enumerate(frames):
            if speed > 0:  # pace by the clock, so a slow send does not stretch the audio
                await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS / speed - time.monotonic()))
            await ws.send(frame)
        if speed > 0:
            await asyncio.sleep(max(0.0, start + seconds / speed - time.monotonic()))
        utterance.stop_sent = time.monotonic()
        await ws.send(stop)
    except BaseException:
        # The socket closed under the sender (a refusal, say): the receiver saw the same close.
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        raise
    await asyncio.wait_for(receiver, timeout=300)


PROTOCOLS = {"ws": ("/ws", stream_file), "realtime": ("/v1/realtime?intent=transcription", stream_file_realtime)}


async def client(url: str, items: list[Item], speed: float, progress, auto_language: bool = False,
                 protocol: str = "ws") -> list[Utterance]:
    import websockets

    path, stream = PROTOCOLS[protocol]
    done = []
    try:
        async with websockets.connect(f"ws://{url}{path}", max_size=None) as ws:
            for item in items:
                done.append(await stream(ws, item, speed, auto_language))
                progress.update(1)
    except Exception as exc:  # a dropped connection is a figure of the run, not a crash of the bench
        refused = isinstance(exc, websockets.ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 1013
        if not refused:
            logger.warning("client dropped: %s", exc)
        prefix = REFUSED if refused else ""
        done.append(Utterance(items[len(done)], error=f"{prefix}{type(exc).__name__}: {exc}"))
    return done


async def run_streams(url: str, plans: list[list[Item]], speed: float, label: str, auto_language: bool = False,
                      protocol: str = "ws") -> list[Utterance]:
    from tqdm import tqdm

    with tqdm(total=sum(map(len, plans)), desc=label, unit="file", file=sys.stderr) as progress:
        results = await asyncio.gather(*(client(url, plan, speed, progress, auto_language, protocol) for plan in plans))
    return [u for per_client in results for u in per_client]


def measure(
    server: Server, plans: list[list[Item]], speed: float, label: str, auto_language: bool = False, protocol: str = "ws"
) -> tuple[list[Utterance], float | None, float]:
    cpu_before, wall = server.cpu_seconds(), time.monotonic()
    utterances = asyncio.run(run_streams(server.url, plans, speed, label, auto_language, protocol))
    cpu_after = server.cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before  # None: not our server
    return utterances, cpu, time.monotonic() - wall
