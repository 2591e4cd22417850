"""The capacity rule, pure: costs in, speakers served out; the live scale; the partial cadence."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from realtime_stt.capacity import (
    LADDER,
    LIVE_AFTER,
    Costs,
    LiveCosts,
    RecentPartials,
    capacity,
    largest_batch,
    loaded,
    on_ladder,
    partial_interval,
    prior_finals_share,
)

# Costs measured at start-up on this machine class (2 cores), two workers of one thread each.
TINY = Costs(partial_fixed=0.055, partial_row=0.114, final_fixed=0.148, final_per_second=0.018)
BASE = Costs(partial_fixed=0.20, partial_row=0.25, final_fixed=0.62, final_per_second=0.05)
TURBO = Costs(partial_fixed=0.0, partial_row=1.97, final_fixed=4.22, final_per_second=0.08)


def served(costs: Costs, *, workers: int = 2, max_batch: int | None = None, cadence: float = 0.5) -> int:
    """The capacity as start-up plans it: the batch size from the same costs, unless given."""
    batch = max_batch or largest_batch(costs, cadence, 8)
    return capacity(costs, prior_finals_share(costs), workers=workers, max_batch=batch, cadence=cadence)


def test_the_ladder_rounds_down_and_each_step_is_a_third_or_more_above_the_last():
    assert [on_ladder(x) for x in (0, 1, 1.9, 2, 5.9, 6, 7.99, 8, 11, 13)] == [1, 1, 1, 2, 4, 6, 6, 8, 8, 12]
    assert all(high / low >= 4 / 3 for low, high in zip(LADDER, LADDER[1:]))


def test_a_cheaper_model_serves_more_speakers_and_a_costly_one_serves_one():
    assert served(TINY) == 8  # what a sweep held here with these costs
    assert served(TINY) > served(BASE) >= 1
    assert served(TURBO, workers=1) == 1


# Measured shapes: tiny.en and base on 2 cores, a small model, a GPU's (a batch costs little more
# than one window). Where one batch alone nearly fills the cadence bound, any noise moves more.
@pytest.mark.parametrize("costs", [TINY, BASE, Costs(0.01, 0.004, 0.02, 0.001), Costs(0.03, 0.0006, 0.05, 0.002)])
@pytest.mark.parametrize("workers", [1, 2])
def test_live_costs_thirty_percent_off_move_the_capacity_one_step_at_most(costs, workers):
    """The live rule (the batch size is the start-up's): noise in the costs moves it one step at most."""
    steps = {step: index for index, step in enumerate(LADDER)}
    middle = served(costs, workers=workers, max_batch=8)
    for factor in (1.3, 1 / 1.3):
        noisy = served(costs.scaled(factor, factor), workers=workers, max_batch=8)
        assert abs(steps[noisy] - steps[middle]) <= 1, (factor, middle, noisy)


def test_a_start_up_timed_thirty_percent_off_moves_the_prior_one_step_at_most():
    """The prior, batch size included, for tiny.en's costs here: 6 to 12 where 8 hold, never 1."""
    assert [served(TINY.scaled(f, f)) for f in (1.3, 1.0, 1 / 1.3)] == [6, 8, 12]


def test_more_speakers_finals_or_slower_partials_lower_the_capacity():
    share = prior_finals_share(TINY)
    base = capacity(TINY, share, workers=2, max_batch=8, cadence=0.5)
    assert capacity(TINY, 10 * share, workers=2, max_batch=8, cadence=0.5) < base  # longer finals, or more of them
    assert capacity(TINY.scaled(2.0, 1.0), share, workers=2, max_batch=8, cadence=0.5) < base
    assert capacity(TINY, share, workers=2, max_batch=8, cadence=1.0) > base  # a slower cadence holds more


def test_with_one_worker_the_finals_take_time_from_the_partials():
    share = prior_finals_share(TINY)
    one = capacity(TINY, share, workers=1, max_batch=8, cadence=0.5)
    assert one <= capacity(TINY, share, workers=2, max_batch=8, cadence=0.5)


def test_live_costs_keep_the_prior_until_enough_calls_then_follow_them():
    live = LiveCosts(TINY)
    for _ in range(LIVE_AFTER - 1):
        live.partial_ran(4, 2 * TINY.partial(4))
        live.final_ran(10.0, 3 * TINY.final(10.0))
    assert live.scale() == (1.0, 1.0) and live.costs() == TINY
    live.partial_ran(4, 2 * TINY.partial(4))
    live.final_ran(10.0, 3 * TINY.final(10.0))
    assert live.scale() == pytest.approx((2.0, 3.0))
    assert live.finals_share() == pytest.approx(3 * TINY.final(10.0) / 10.0)
    assert live.seen == {"partial_batches": LIVE_AFTER, "finals": LIVE_AFTER}


def test_live_costs_read_between_calls_follow_every_call():
    live = LiveCosts(TINY)
    ratios, shares = [], []
    for n in range(3 * LIVE_AFTER):
        live.costs(), live.finals_share()  # read, as the engine does between calls
        ratio = 1.0 + n / 10
        live.partial_ran(2, ratio * TINY.partial(2))
        live.final_ran(5.0, ratio * TINY.final(5.0))
        ratios.append(ratio)
        shares.append(ratio * TINY.final(5.0) / 5.0)
        if len(ratios) >= LIVE_AFTER:
            median = statistics.median(ratios)
            assert vars(live.costs()) == pytest.approx(vars(TINY.scaled(median, median)))
            assert live.finals_share() == pytest.approx(statistics.median(shares))


def test_a_spike_moves_the_live_scale_little_and_a_sustained_change_moves_it():
    live = LiveCosts(TINY)
    for _ in range(3 * LIVE_AFTER):
        live.partial_ran(2, TINY.partial(2))
    live.partial_ran(2, 20 * TINY.partial(2))  # one call held up by something else
    assert live.scale()[0] == pytest.approx(1.0)
    for _ in range(64):
        live.partial_ran(2, 1.5 * TINY.partial(2))
    assert live.scale()[0] == pytest.approx(1.5)


def test_partials_go_fast_on_the_same_grid_while_the_model_has_time():
    assert partial_interval(500, 250, lag=0.3, speakers=1, capacity=4) == 0.25  # twice as often
    assert partial_interval(500, 250, lag=0.3, speakers=2, capacity=4) == 0.25
    assert partial_interval(500, 250, lag=0.3, speakers=3, capacity=4) == 0.5  # twice 3 do not fit
    assert partial_interval(500, 250, lag=0.6, speakers=1, capacity=4) == 0.5  # partials run late
    assert partial_interval(500, 250, lag=0.3, speakers=1, capacity=4, speaking=False) == 0.5  # a pause
    assert partial_interval(600, 250, lag=0.1, speakers=1, capacity=4) == 0.3  # a whole fraction: one grid
    assert partial_interval(2000, 250, lag=0.5, speakers=1, capacity=16) == 0.25
    assert partial_interval(500, 0, lag=0.0, speakers=1, capacity=4) == 0.5  # off
    assert partial_interval(500, 700, lag=0.0, speakers=1, capacity=4) == 0.5  # not faster: off


def test_before_the_first_words_show_partials_go_faster_still_while_the_model_has_time():
    first = {"first_ms": 125, "first_words": True}
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=4, **first) == 0.125  # four times as often
    assert partial_interval(500, 250, lag=0.1, speakers=2, capacity=4, **first) == 0.25  # four times 2 do not fit
    assert partial_interval(500, 250, lag=0.1, speakers=3, capacity=4, **first) == 0.5
    assert partial_interval(500, 250, lag=0.6, speakers=1, capacity=4, **first) == 0.5  # partials run late
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=4, speaking=False, **first) == 0.5
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=4, first_ms=125) == 0.25  # words shown
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=4, first_ms=0, first_words=True) == 0.25  # off
    assert partial_interval(500, 0, lag=0.1, speakers=1, capacity=4, **first) == 0.125  # without the fast grid
    assert partial_interval(600, 250, lag=0.1, speakers=1, capacity=8, **first) == 0.12  # a whole fraction: one grid
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=4, first_ms=400, first_words=True) == 0.25  # never slower


def test_a_machine_is_loaded_past_half_its_capacity_or_with_late_partials():
    assert not loaded(500, lag=0.2, speakers=2, capacity=4)  # fast partials for both still fit
    assert loaded(500, lag=0.2, speakers=3, capacity=4)
    assert loaded(500, lag=0.6, speakers=1, capacity=4)  # late partials: loaded whatever the count
    assert not loaded(500, lag=0.0, speakers=0, capacity=1)


def test_a_lone_speaker_gets_the_fast_grids_whenever_one_partial_fits_them():
    # Whatever the capacity says, a speaker alone is served as fast as one partial allows.
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=1, alone_seconds=0.1) == 0.25
    first = {"first_ms": 125, "first_words": True}
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=1, alone_seconds=0.1, **first) == 0.125
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=1, alone_seconds=0.2, **first) == 0.25
    assert partial_interval(500, 250, lag=0.1, speakers=1, capacity=1, alone_seconds=0.3) == 0.5  # too slow
    assert partial_interval(500, 250, lag=0.1, speakers=2, capacity=1, alone_seconds=0.01) == 0.5  # not alone


# One step each: a session asks for a partial, a partial is answered, a session ends, or the load is read.
_STEPS = st.lists(
    st.tuples(st.sampled_from(["ask", "answer", "forget", "read"]), st.integers(0, 4), st.floats(0, 2), st.floats(0, 3)),
    max_size=60,
)


@given(_STEPS)
# A session that asks again is the newest asker: one that asked once in between ages out before it.
@example([("ask", 0, 0.0, 0.0), ("ask", 1, 0.0, 0.5), ("ask", 0, 0.0, 3.0), ("read", 0, 0.0, 0.5)])
def test_recent_partials_read_as_a_fresh_count_and_sort_of_what_is_recent(steps):
    recent = RecentPartials(streaming_seconds=3.0, lag_seconds=5.0)
    asked: dict[int, float] = {}
    lags: list[tuple[float, float, int]] = []
    now = 0.0
    for step, who, lag, later in steps:
        now += later
        if step == "ask":
            recent.asked(who, now)
            asked[who] = now
        elif step == "answer":
            recent.answered(who, lag, now)
            lags.append((now, lag, who))
        elif step == "forget":
            recent.forget(who)
            asked.pop(who, None)
            lags = [entry for entry in lags if entry[2] != who]
        else:
            streaming = {r for r, t in asked.items() if t >= now - 3.0}
            assert set(recent.streaming(now)) == streaming
            kept = sorted(l for t, l, _ in lags if t >= now - 5.0)
            for quantile in (0.5, 0.9):
                assert recent.lag(quantile, now) == (kept[int(quantile * (len(kept) - 1))] if kept else 0.0)
