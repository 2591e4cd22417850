"""From measured costs to working values, with plain numbers: the shapes of the rules, not the
machine."""

from __future__ import annotations

from dataclasses import replace

from realtime_stt.capacity import Costs, better, final_seconds, loaded, partial_interval, partial_seconds, plan

# Roughly tiny.en on two slow cores, one thread a worker.
SMALL = Costs(
    vad_features=0.004, encode_partial=0.03, encode_busy=0.04, encode_busy_windows=2, encode_final=0.2,
    generate_1=0.08, generate_batch=0.17, align_1=0.01, align_batch=0.03, batch=8,
)
# Roughly base on the same cores, one worker with both threads.
BASE = Costs(
    vad_features=0.013, encode_partial=0.12, encode_busy=0.14, encode_busy_windows=2, encode_final=0.46,
    generate_1=0.21, generate_batch=0.56, align_1=0.03, align_batch=0.18, batch=8,
)
# Roughly large-v3-turbo on the same two cores, two threads.
BIG = Costs(
    vad_features=0.004, encode_partial=1.2, encode_busy=1.6, encode_busy_windows=2, encode_final=4.8,
    generate_1=0.33, generate_batch=1.1, align_1=0.05, align_batch=0.2, batch=8,
)


def choose(costs: Costs, **given):
    return plan(costs, workers=given.get("workers", 2), partial_every_ms=given.get("every", 500),
                cadence_given=given.get("cadence_given", False), max_batch=given.get("max_batch"))


def test_a_cheap_model_serves_many_at_the_asked_cadence():
    chosen = choose(SMALL)
    assert chosen.within_bounds and chosen.partial_every_ms == 500 and not chosen.busy_span_always
    assert chosen.max_batch == 8  # every measured batch fits the cadence
    assert chosen.capacity >= 8
    # More speakers than one batch take more batches a tick: capacity is where they no longer fit.
    assert choose(SMALL, max_batch=1).capacity < chosen.capacity


def test_a_costly_model_slows_its_cadence_and_says_it_is_out_of_bounds():
    chosen = choose(BIG, workers=1)
    assert chosen.busy_span_always  # the 15 s span cannot keep up even for one speaker
    assert chosen.partial_every_ms > 1000 and chosen.partial_every_ms % 100 == 0
    assert chosen.capacity == 1 and not chosen.within_bounds  # a 4.8 s encode: no final within 2 s
    assert "use a smaller model" in chosen.describe("large-v3-turbo", "cpu")
    assert chosen.final_seconds > 4.8


def test_what_the_user_set_wins():
    chosen = choose(BIG, workers=1, every=500, cadence_given=True, max_batch=3)
    assert chosen.partial_every_ms == 500 and chosen.max_batch == 3


def test_costs_grow_with_the_batch_and_the_utterance():
    assert partial_seconds(SMALL, 1) < partial_seconds(SMALL, 2) < partial_seconds(SMALL, 8)
    assert partial_seconds(SMALL, 8) < 8 * partial_seconds(SMALL, 1)  # batching pays
    assert final_seconds(SMALL, 5) < final_seconds(SMALL, 20) < final_seconds(SMALL, 40)
    assert final_seconds(SMALL, 40) >= 2 * SMALL.encode_final  # two 30 s windows


def test_the_layout_that_serves_more_speakers_wins():
    two = choose(SMALL, workers=2)
    one = choose(replace(SMALL, encode_busy=0.08, generate_batch=0.34), workers=1)
    assert two.capacity > one.capacity and better(two, one) is two and better(one, two) is two
    # A tie in speakers goes to the layout with a finals worker, unless one worker's finals are
    # clearly faster.
    alone, paired = choose(BASE, workers=1), choose(BASE, workers=2)
    assert alone.capacity == paired.capacity and better(alone, paired) is paired is better(paired, alone)
    sooner = choose(replace(BASE, encode_partial=0.3, encode_busy=0.6, encode_final=0.05, generate_1=0.08, generate_batch=1.5), workers=1)
    assert sooner.capacity == paired.capacity and better(paired, sooner) is sooner
    slow = choose(BIG, workers=2)
    fast = choose(replace(BIG, encode_partial=0.6, encode_busy=0.8, encode_final=2.4), workers=1)
    assert better(slow, fast) is fast


def test_one_worker_serves_a_speaker_whose_partials_fit_the_cadence():
    """Base on two slow cores, one worker: a 0.37 s partial every 0.5 s and a 0.8 s final serve one
    speaker; the worker being busy most of the time is no reason to call that out of bounds."""
    chosen = choose(BASE, workers=1)
    assert chosen.within_bounds and chosen.capacity >= 1 and chosen.partial_every_ms == 500


def test_with_one_worker_the_others_finals_hold_up_partials_and_a_second_worker_frees_them():
    from realtime_stt.capacity import predicted_p95

    def p95(workers, speakers):
        return predicted_p95(SMALL, speakers, workers=workers, max_batch=8, cadence=0.5, busy_span_always=False)

    # Alone, a speaker's own final never delays its partials or waits for another's.
    assert p95(1, 1)[0] == p95(2, 1)[0] == 0.5
    assert p95(1, 1)[1] == final_seconds(SMALL, 25) + partial_seconds(SMALL, 1)
    # Several: on one worker a round of partials waits behind someone's final; on two it does not.
    assert p95(1, 4)[0] >= final_seconds(SMALL, 10) + partial_seconds(SMALL, 4) > p95(2, 4)[0]
    assert p95(2, 4)[1] < p95(1, 4)[1]


def test_a_start_up_on_a_busier_moment_does_not_fall_to_one_speaker():
    # tiny.en as a server on this machine measured it (2026-11-27), then 20 % slower: the two-worker
    # layout's predicted final p95 is flat from two speakers on, so the final's bound decided
    # between 4 speakers and 1.
    measured = Costs(
        vad_features=0.0131, encode_partial=0.1059, encode_busy=0.1331, encode_busy_windows=2, encode_final=0.4331,
        generate_1=0.1085, generate_batch=0.243, align_1=0.0185, align_batch=0.1727, batch=8,
    )
    slower = Costs(**{k: v * 1.2 if isinstance(v, float) else v for k, v in measured.__dict__.items()})
    assert choose(measured).capacity == 4
    assert choose(slower).capacity == 4
    # base as the same machine measured it: 1 speaker held, 2 had a final p95 of 2.16 s. Still 1.
    base = Costs(
        vad_features=0.0123, encode_partial=0.2081, encode_busy=0.2456, encode_busy_windows=2, encode_final=0.8044,
        generate_1=0.1921, generate_batch=0.514, align_1=0.0332, align_batch=0.2433, batch=8,
    )
    assert choose(base).capacity == 1


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
