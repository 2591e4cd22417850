"""Capacity, pure: from what model calls cost on this machine (measured at start-up) to the working
values that follow: the batch size, the partial encoder span, the fastest partial cadence the
machine can hold, and how many real-time speakers it can serve.

A speaker streams; every tick of the partial cadence the engine decodes one window per speaker,
in batches of at most ``max_batch``, on its partial workers; at each stop it decodes the whole
utterance on the finals worker (or, with one worker, on the same one). Served means: partial
cadence p95 within 2x PARTIAL_EVERY_MS and final latency p95 within 2 s, the benchmark's bounds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PARTIAL_TOKENS = 24  # tokens a partial window of a few seconds of speech decodes to
TOKENS_PER_SECOND = 3.5  # of speech, for a final
TYPICAL_UTTERANCE = 10.0  # seconds a push-to-talk utterance lasts
LONG_UTTERANCE = 25.0  # the long end (p95) of push-to-talk utterances, for the final bound
PAUSE = 1.0  # seconds between one utterance's stop and the next one's audio
FINAL_BOUND = 2.0  # seconds, final latency p95
# Model time is not wall time under load: the event loop, VAD scoring and the other worker share the
# cores. A plan for several speakers holds only with this much room left (fitted to the benchmark's
# sweeps, README); one speaker alone has the machine to itself and needs none.
ROOM = 0.7
# A final on a worker of its own waits for no partials: its predicted p95 came within a fifth of the
# measured one at every level of the sweeps (README), so it keeps less room. With ROOM, 20 % slower
# costs at start-up turned tiny.en's capacity from 4 into 1 (the predicted final is flat from two
# speakers on); the partials' bound is what holds it back under load.
FINAL_ROOM = 0.85
CADENCE_ROOM = 0.9  # one speaker alone: partials come as fast as one takes, with this room
MOST_SPEAKERS = 4096


@dataclass(frozen=True)
class Costs:
    """Seconds a model call takes on this machine, with the workers it was measured under."""

    vad_features: float  # VAD and log-mel features of one window
    encode_partial: float  # a 5 s window at the partial span (15 s in all), batch 1
    encode_busy: float  # the busy span (10 s): two windows on CPU, ``batch`` on a GPU
    encode_busy_windows: int  # how many windows encode_busy covers
    encode_final: float  # one 30 s window
    generate_1: float  # greedy, PARTIAL_TOKENS tokens, batch 1
    generate_batch: float  # the same at batch ``batch``
    align_1: float  # word alignment of PARTIAL_TOKENS tokens, batch 1
    align_batch: float
    batch: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Plan:
    """The working values calibration chose, and what it predicts of them."""

    workers: int
    max_batch: int
    busy_span_always: bool  # the 10 s partial span even for one speaker: the 15 s one is too slow
    partial_every_ms: int
    capacity: int  # real-time speakers served within the bounds (at least 1: one is always admitted)
    within_bounds: bool  # False: even one speaker gets slower partials or finals than the bounds
    partial_seconds: float  # predicted model time of one speaker's partial
    final_seconds: float  # predicted final of a TYPICAL_UTTERANCE
    costs: Costs

    def describe(self, model: str, device: str) -> str:
        """One line a person understands."""
        speakers = f"about {self.capacity} speaker{'s' if self.capacity != 1 else ''} in real time"
        if model.count("/") > 1:  # a local directory: its name, or its parent's where that says more
            parts = model.rstrip("/").split("/")
            model = "/".join(parts[-2:]) if parts[-1] in ("model", "models") else parts[-1]
        line = (
            f"{model} on {device}: {speakers}, a partial every {self.partial_every_ms / 1000:.1f} s, "
            f"finals in about {self.final_seconds:.1f} s ({self.workers} inference worker(s), batches of {self.max_batch})"
        )
        return line if self.within_bounds else line + "; slower than the bounds even for one speaker: use a smaller model"

    def as_dict(self) -> dict:
        return {
            "workers": self.workers,
            "max_batch": self.max_batch,
            "partial_span_seconds": 10 if self.busy_span_always else 15,
            "partial_every_ms": self.partial_every_ms,
            "capacity": self.capacity,
            "within_bounds": self.within_bounds,
            "predicted_partial_s": round(self.partial_seconds, 3),
            "predicted_final_s": round(self.final_seconds, 3),
            "measured": self.costs.as_dict(),
        }


def interpolate(one: float, many: float, at: int, n: int) -> float:
    """Cost at batch ``n``, from batch 1 and batch ``many``'s (linear: fixed cost plus per row)."""
    return one if at <= 1 else one + (many - one) * (n - 1) / (at - 1)


def partial_seconds(costs: Costs, n: int, *, busy_span_always: bool = False) -> float:
    """Model time of one batch of ``n`` partial windows."""
    if n > 2 or busy_span_always:  # encoded ``encode_busy_windows`` at a time
        windows = costs.encode_busy_windows
        encode = costs.encode_busy * (n / windows if n < windows else math.ceil(n / windows))
    else:
        encode = n * costs.encode_partial
    generate = interpolate(costs.generate_1, costs.generate_batch, costs.batch, n)
    align = interpolate(costs.align_1, costs.align_batch, costs.batch, n)
    return n * costs.vad_features + encode + generate + align


def final_seconds(costs: Costs, utterance: float) -> float:
    """Model time of the final of an utterance this long (one 30 s window, greedy)."""
    per_token = (costs.generate_1 + costs.align_1) / PARTIAL_TOKENS
    windows = max(1, math.ceil(utterance / 30))
    tokens = TOKENS_PER_SECOND * utterance
    return windows * costs.encode_final + tokens * per_token + costs.vad_features * utterance / 6


def tick_seconds(costs: Costs, speakers: int, max_batch: int, partial_workers: int, busy_span_always: bool) -> float:
    """How long the partial workers take for one round of every speaker's partial."""
    batches = math.ceil(speakers / max_batch)
    rounds = math.ceil(batches / partial_workers)
    return rounds * partial_seconds(costs, min(speakers, max_batch), busy_span_always=busy_span_always)


def predicted_p95(costs: Costs, speakers: int, *, workers: int, max_batch: int, cadence: float,
                  busy_span_always: bool) -> tuple[float, float]:
    """Predicted partial cadence p95 and final latency p95 of ``speakers`` real-time speakers.

    The other speakers' finals keep a worker busy for a share of the time; once that share passes
    5 %, the p95 final waits for the rest of one of theirs first. With one worker, partials wait
    behind the other speakers' finals too: then the p95 round of partials is one after a final.
    """
    partial_workers = workers - 1 if workers > 1 else 1
    tick = tick_seconds(costs, speakers, max_batch, partial_workers, busy_span_always)
    typical, longest = final_seconds(costs, TYPICAL_UTTERANCE), final_seconds(costs, LONG_UTTERANCE)
    finals_share = speakers * typical / (TYPICAL_UTTERANCE + PAUSE)
    if finals_share >= 1:
        return math.inf, math.inf
    others = (speakers - 1) * typical / (TYPICAL_UTTERANCE + PAUSE)  # the share of the others' finals
    queued = typical / 2 if others > 0.05 else 0.0  # the rest of another's final under way
    if workers > 1:  # the finals have a worker of their own
        return max(cadence, tick), longest + queued
    blocked = typical if others > 0.05 else 0.0  # a round of partials that came after a final
    # A speaker's own final comes after its partials; only the others' take the worker from them.
    return max(cadence, tick / (1 - others) + blocked), longest + tick + queued


def serves(costs: Costs, speakers: int, *, workers: int, max_batch: int, cadence: float, busy_span_always: bool) -> bool:
    """Whether ``speakers`` real-time speakers get partial cadence p95 <= 2x cadence and final p95 <= 2 s."""
    room = ROOM if speakers > 1 else 1.0
    final_room = (FINAL_ROOM if workers > 1 else ROOM) if speakers > 1 else 1.0
    partial, final = predicted_p95(costs, speakers, workers=workers, max_batch=max_batch, cadence=cadence,
                                   busy_span_always=busy_span_always)
    return partial <= room * 2 * cadence and final <= final_room * FINAL_BOUND


def plan(
    costs: Costs,
    *,
    workers: int,
    partial_every_ms: int,
    cadence_given: bool,
    max_batch: int | None,
) -> Plan:
    """The working values for these costs; values the user set (not None, or ``cadence_given``) win."""
    one = partial_seconds(costs, 1)
    busy_span_always = one > partial_every_ms / 1000  # the 15 s span cannot keep the cadence even alone
    one = partial_seconds(costs, 1, busy_span_always=busy_span_always)
    cadence_ms = partial_every_ms
    if not cadence_given:  # as fast as asked, or as fast as one speaker's partial allows
        cadence_ms = max(partial_every_ms, 100 * math.ceil(10 * one / CADENCE_ROOM))
    cadence = cadence_ms / 1000
    batch = max_batch or _largest_batch(costs, cadence, busy_span_always)
    capacity = next((n - 1 for n in range(1, MOST_SPEAKERS + 1)
                     if not serves(costs, n, workers=workers, max_batch=batch, cadence=cadence, busy_span_always=busy_span_always)),
                    MOST_SPEAKERS)
    return Plan(
        workers=workers,
        max_batch=batch,
        busy_span_always=busy_span_always,
        partial_every_ms=cadence_ms,
        capacity=max(1, capacity),
        within_bounds=capacity >= 1,
        partial_seconds=one,
        final_seconds=final_seconds(costs, TYPICAL_UTTERANCE),
        costs=costs,
    )


def _largest_batch(costs: Costs, cadence: float, busy_span_always: bool) -> int:
    """The most windows one batch may hold and still return within the cadence bound; at most the
    batch the costs were measured at (larger ones would be guesses)."""
    fits = [n for n in range(1, costs.batch + 1) if partial_seconds(costs, n, busy_span_always=busy_span_always) <= ROOM * 2 * cadence]
    return max(fits, default=1)


def better(a: Plan, b: Plan) -> Plan:
    """Of two worker layouts, the one that serves more speakers. On a tie, the one with more
    workers (a worker of its own for the finals: no final waits for a batch of partials, which the
    sweeps showed to matter more than the predictions say), unless the other's single speaker gets
    clearly faster finals (by a fifth or more, as a large model's one worker with every thread does)."""
    def score(chosen: Plan) -> int:
        return chosen.capacity if chosen.within_bounds else 0

    if score(a) != score(b):
        return a if score(a) > score(b) else b
    many, few = (a, b) if a.workers >= b.workers else (b, a)

    def single_final(chosen: Plan) -> float:
        return predicted_p95(chosen.costs, 1, workers=chosen.workers, max_batch=chosen.max_batch,
                             cadence=chosen.partial_every_ms / 1000, busy_span_always=chosen.busy_span_always)[1]

    return few if single_final(few) <= 0.8 * single_final(many) else many


def loaded(every_ms: int, *, lag: float, speakers: int, capacity: int) -> bool:
    """Whether the machine is more than half full: more than half the calibrated ``capacity``
    streams now, or partials run late (``lag``, request to text, past ``every_ms``). A partial's
    cost then decides how soon the next one comes. With the default cadences this is where
    ``partial_interval``'s 250 ms grid stops fitting; it does not follow FAST_PARTIAL_EVERY_MS, so
    that turning fast partials off does not count one speaker as load."""
    return lag > every_ms / 1000 or 2 * speakers > capacity


def partial_interval(
    every_ms: int,
    fast_ms: int,
    *,
    lag: float,
    speakers: int,
    capacity: int,
    speaking: bool = True,
    first_ms: int = 0,
    first_words: bool = False,
) -> float:
    """Seconds to the next partial: ``every_ms``, or a whole fraction of it near ``fast_ms`` while
    the speaker is ``speaking`` and the model has time for it. Fast partials cost ``every_ms / fast``
    times the model time, so they are taken while that many times the ``speakers`` streaming now
    fit the calibrated ``capacity``, and while partials are not late (``lag``, request to text,
    within ``every_ms``). A word then waits less for the decode that shows it; the fast grid holds
    the slow one's points, so fast and slow speakers still meet in one batch. In a pause the text
    changes little, and the model's time is better spent on the (speculative) final.

    Until an utterance shows its first words (``first_words``), a faster grid near ``first_ms``
    comes first under the same rule: Whisper reads the first word only once most of it is heard,
    and LocalAgreement shows it once two decodes agree, so the sooner the decode after that, the
    sooner the first text. It lasts a fraction of a second per utterance."""
    slow = every_ms / 1000
    if not speaking or lag > slow:
        return slow
    for ms in sorted((first_ms, fast_ms) if first_words else (fast_ms,)):  # the fastest that fits
        if 0 < ms < every_ms:
            interval = slow / round(slow / (ms / 1000))
            if speakers * slow / interval <= capacity:
                return interval
    return slow
