"""Protocol fuzz: random sequences of frames against a real server (tiny.en), each checked against
what the protocol says, and the server checked after each one."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from dataclasses import dataclass

import pytest
import websockets
from conftest import manifest, read_pcm, speak, start_server, wer
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

MAX_UTTERANCE_SECONDS = 20
CLIP = "en_ljspeech_LJ002-0020.wav"  # 1.5 s, "In eighteen thirteen"


@dataclass(frozen=True)
class Audio:
    size: int
    seed: int

    def data(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)


@dataclass(frozen=True)
class Text:
    text: str
    valid_config: bool = False  # a config the server takes (before an utterance's audio)
    stop: bool = False


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Close:
    pass


def invalid_json() -> st.SearchStrategy[Text]:
    def not_an_object(text: str) -> bool:
        try:
            return not isinstance(json.loads(text), dict)
        except (ValueError, RecursionError):
            return True

    deep = st.integers(1, 200_000).flatmap(
        lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])
    )
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=12,
    )
    return st.one_of(
        st.text(max_size=200).filter(not_an_object),  # any unicode, mostly not JSON
        values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
        deep.map(lambda text: text if not_an_object(text) else "[" + text),
    ).map(Text)


def messages() -> st.SearchStrategy[Text]:
    languages = st.sampled_from(["en", "auto", None, " EN ", ""])
    valid = st.fixed_dictionaries(
        {},
        optional={
            "type": st.just("config"),
            "language": languages,
            "task": st.just("transcribe"),
            "beam_size": st.integers(1, 10),
        },
    ).map(lambda d: Text(json.dumps(d), valid_config=True))
    wrong_value = st.one_of(
        st.fixed_dictionaries({"beam_size": st.integers().filter(lambda b: not 1 <= b <= 10) | st.text(max_size=5)}),
        st.fixed_dictionaries({"task": st.text(max_size=10).filter(lambda t: t != "transcribe")}),
        st.fixed_dictionaries({"language": st.text(min_size=1, max_size=30).filter(lambda x: x.strip().lower() not in ("en", "auto", ""))}),
        st.fixed_dictionaries({"language": st.integers() | st.lists(st.integers(), max_size=3) | st.booleans()}),
        st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("type", "language", "task", "beam_size")), st.integers(), min_size=1, max_size=3),
        st.fixed_dictionaries({"type": st.text(max_size=10).filter(lambda t: t not in ("config", "stop"))}),
        st.fixed_dictionaries({"type": st.just("stop"), "now": st.booleans()}),
    ).map(lambda d: Text(json.dumps(d)))
    stop = st.just(Text(json.dumps({"type": "stop"}), stop=True))
    return st.one_of(valid, wrong_value, stop, stop, invalid_json())


def actions() -> st.SearchStrategy[list]:
    # Mostly frames a microphone sends, some of several seconds, and some near 1 MiB (33 s of audio,
    # past the server's MAX_UTTERANCE_SECONDS here, which must close the socket with 1009).
    sizes = st.one_of(st.integers(0, 4000), st.integers(0, 64_000), st.integers(0, 300_000), st.integers(500_000, 1 << 20))
    audio = st.builds(Audio, sizes, st.integers(0, 2**32))
    return st.lists(st.one_of(audio, audio, messages(), st.just(Ping()), st.just(Close())), max_size=8)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    env = {"MAX_UTTERANCE_SECONDS": str(MAX_UTTERANCE_SECONDS)}
    with start_server(env, tmp_path_factory.mktemp("fuzz")) as running:
        yield running


async def play(url: str, sequence: list) -> None:
    """Run one sequence; every reply must be what the protocol says, and no close may be 1011."""
    expected: list[str] = []  # replies other than partials, in order: 'error' or 'final'
    received: list[dict] = []
    sent = 0  # bytes of the utterance under way
    async with websockets.connect(url, max_size=None) as ws:

        async def receive() -> None:
            while True:
                message = json.loads(await ws.recv())
                if message["type"] != "partial":
                    received.append(message)

        receiver = asyncio.create_task(receive())
        too_long = closed_early = False
        for action in sequence:
            if isinstance(action, Close):
                closed_early = True  # replies still on their way are lost with the socket: not counted
                await ws.close()
                break
            if isinstance(action, Ping):
                await asyncio.wait_for(await ws.ping(), 10)
            elif isinstance(action, Audio):
                sent += action.size
                await ws.send(action.data())
                if sent // 2 > MAX_UTTERANCE_SECONDS * 16000:
                    too_long = True
                    break
            elif action.stop:
                expected.append("final")
                sent = 0
                await ws.send(action.text)
            else:
                expected.append("error" if not action.valid_config or sent >= 2 else "none")
                await ws.send(action.text)
        else:
            expected.append("final")  # end the last utterance as a client would
            await ws.send(json.dumps({"type": "stop"}))
        try:
            if not closed_early:
                await asyncio.wait_for(until(lambda: len(received) >= expected.count("error") + expected.count("final")), 120)
            if not (too_long or closed_early):
                await ws.close()
        finally:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(receiver, 30)
        code = receiver.exception().rcvd.code if receiver.exception().rcvd else None
    event(f"closed with {code}")
    event(f"{expected.count('final')} finals, {expected.count('error')} errors")
    assert code != 1011, sequence
    if too_long:
        assert code == 1009, (code, sequence)
    elif not closed_early:
        assert [m["type"] for m in received] == [e for e in expected if e != "none"], (received, sequence)


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.02)


def health(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
        return json.loads(response.read())


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run of the same code: CI stays deterministic
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure shows its example as found, in bounded time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sequence=actions())
def test_random_frames_get_what_the_protocol_says_and_harm_no_one(fuzz_server, sequence):
    asyncio.run(play(fuzz_server.ws_url, sequence))
    asyncio.run(asyncio.wait_for(until(lambda: health(fuzz_server)["sessions"] == 0), 30))
    assert "Traceback" not in fuzz_server.log_text()

    async def normal() -> str:
        async with websockets.connect(fuzz_server.ws_url) as ws:
            return (await speak(ws, read_pcm(CLIP))).final["text"]

    assert wer(manifest()[CLIP]["text"], asyncio.run(normal())) == 0.0
