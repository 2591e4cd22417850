"""Clients that stream files over real WebSockets, paced like speech, recording every message."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
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
    pcm = read_pcm(item.path)
    utterance = Utterance(item)
    frame = int(16000 * FRAME_SECONDS) * 2

    async def receive() -> None:
        while True:
            message = json.loads(await ws.recv())
            utterance.messages.append((time.monotonic(), message))
            if message.get("type") == "final":
                return

    receiver = asyncio.create_task(receive())
    config = {"task": "transcribe", "beam_size": 1} if auto_language else {"language": item.language, "task": "transcribe", "beam_size": 1}
    await ws.send(json.dumps(config))
    start = utterance.first_audio = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), frame)):
        if speed > 0:  # pace by the clock, so a slow send does not stretch the audio
            await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS / speed - time.monotonic()))
        await ws.send(pcm[offset : offset + frame])
    if speed > 0:
        await asyncio.sleep(max(0.0, start + len(pcm) / 32000 / speed - time.monotonic()))
    utterance.stop_sent = time.monotonic()
    await ws.send(json.dumps({"type": "stop"}))
    await asyncio.wait_for(receiver, timeout=300)
    return utterance


async def client(url: str, items: list[Item], speed: float, progress, auto_language: bool = False) -> list[Utterance]:
    import websockets

    done = []
    try:
        async with websockets.connect(f"ws://{url}/ws", max_size=None) as ws:
            for item in items:
                done.append(await stream_file(ws, item, speed, auto_language))
                progress.update(1)
    except Exception as exc:  # a dropped connection is a figure of the run, not a crash of the bench
        refused = isinstance(exc, websockets.ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 1013
        if not refused:
            logger.warning("client dropped: %s", exc)
        prefix = REFUSED if refused else ""
        done.append(Utterance(items[len(done)], error=f"{prefix}{type(exc).__name__}: {exc}"))
    return done


async def run_streams(url: str, plans: list[list[Item]], speed: float, label: str, auto_language: bool = False) -> list[Utterance]:
    from tqdm import tqdm

    with tqdm(total=sum(map(len, plans)), desc=label, unit="file", file=sys.stderr) as progress:
        results = await asyncio.gather(*(client(url, plan, speed, progress, auto_language) for plan in plans))
    return [u for per_client in results for u in per_client]


def measure(
    server: Server, plans: list[list[Item]], speed: float, label: str, auto_language: bool = False
) -> tuple[list[Utterance], float | None, float]:
    cpu_before, wall = server.cpu_seconds(), time.monotonic()
    utterances = asyncio.run(run_streams(server.url, plans, speed, label, auto_language))
    cpu_after = server.cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before  # None: not our server
    return utterances, cpu, time.monotonic() - wall
