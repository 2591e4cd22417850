"""The outbox that stands between the pipeline and a client that may read slowly, and the limits on
what the server echoes back."""

from __future__ import annotations

import asyncio

from realtime_stt.protocol import Outbox, Outgoing, close_reason, short


def run(coroutine):
    return asyncio.run(coroutine)


def partial(text: str) -> Outgoing:
    return Outgoing(text, "partial", 0.0)


def test_a_slow_reader_gets_the_newest_partial_and_every_final_in_order():
    async def scenario():
        outbox = Outbox(most=4)
        assert outbox.put_partial(partial("p1")) is False
        assert outbox.put_partial(partial("p2")) is True  # p1 was never sent: replaced
        assert outbox.put(Outgoing("error", "error", 0.0))
        first, second = await outbox.take(), await outbox.take()
        assert (first.text, second.text) == ("error", "p2")  # errors and finals first, then the partial
        outbox.put_partial(partial("p3"))
        outbox.put(Outgoing("final", "final", 0.0))  # p3 belongs to the utterance that just ended
        outbox.put_partial(partial("next utterance"))
        return [(await outbox.take()).text for _ in range(2)]

    assert run(scenario()) == ["final", "next utterance"]


def test_a_client_that_lets_messages_pile_up_is_told_apart():
    async def scenario():
        outbox = Outbox(most=2)
        return [outbox.put(Outgoing(str(i), "error", 0.0)) for i in range(3)]

    assert run(scenario()) == [True, True, False]


def test_flushed_waits_until_the_last_message_is_sent():
    async def scenario():
        outbox = Outbox()
        await asyncio.wait_for(outbox.flushed(), 1)  # nothing to send
        outbox.put(Outgoing("final", "final", 0.0))
        waiter = asyncio.create_task(outbox.flushed())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await outbox.take()
        await asyncio.sleep(0.01)
        assert not waiter.done(), "taken is not yet sent"
        outbox.sent()
        await asyncio.wait_for(waiter, 1)

    run(scenario())


def test_what_goes_back_to_the_client_is_bounded():
    assert close_reason("x" * 500).encode().__len__() <= 123
    assert close_reason("ünïcödé " * 30).encode().__len__() <= 123
    assert close_reason("short reason") == "short reason"
    assert short("a" * 10_000).__len__() <= 40 and short("dance") == "'dance'"
