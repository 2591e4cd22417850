"""Capacity, pure: how many real-time speakers the workers serve within the bounds, from what the
model calls cost. A few calls timed at start-up give the prior; the calls the server then runs for
its speakers scale it (``LiveCosts``), so admission follows the machine as it is today.

The rule, in three sentences. Each speaker needs a partial at least once per cadence bound (twice
PARTIAL_EVERY_MS), at the cost of one row of a batch of as many windows as there are speakers (up
to ``max_batch``), and its finals: their model time per second of speech. Speakers are served
while those needs fill at most ROOM of the workers' time (the rest is the server's own: VAD,
features, the event loop) and one batch comes back within the cadence bound. The capacity is the
most speakers served, rounded down to a step of LADDER, so that costs 30 % off move it one step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass

PARTIAL_TOKENS = 24  # tokens a partial window of a few seconds of speech decodes to
TOKENS_PER_SECOND = 3.5  # of speech, for a final
LONG_UTTERANCE = 25.0  # the long end (p95) of push-to-talk utterances, for the final bound
FINAL_BOUND = 2.0  # seconds, final latency p95
# Fitted once to a sweep with admission off (README, "What to expect"): the share of the workers'
# time the speakers' model calls may fill; VAD, features and the event loop share the cores.
ROOM = 0.8
CADENCE_ROOM = 0.9  # one speaker alone: partials come as fast as one takes, with this room
# Each step at least 4/3 of the one below it: a cost 30 % off moves the capacity one step at most.
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
LIVE_CALLS = 64  # the live scale is the median of this many recent calls' measured/predicted
LIVE_AFTER = 8  # calls of a kind seen before the live scale replaces the prior's


@dataclass(frozen=True)
class Costs:
    """Seconds model calls take on this machine: a partial batch is fixed + row x windows, a final
    fixed + per second of speech."""

    partial_fixed: float
    partial_row: float
    final_fixed: float
    final_per_second: float

    def partial(self, rows: int) -> float:
        return self.partial_fixed + self.partial_row * rows

    def final(self, seconds: float) -> float:
        return self.final_fixed + self.final_per_second * seconds

    def scaled(self, partial: float, final: float) -> Costs:
        return Costs(self.partial_fixed * partial, self.partial_row * partial, self.final_fixed * final,
                     self.final_per_second * final)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def on_ladder(speakers: float) -> int:
    """The largest step of LADDER at or below ``speakers`` (at least 1: one is always admitted)."""
    return max((step for step in LADDER if step <= speakers), default=1)


def round_seconds(costs: Costs, speakers: int, *, max_batch: int, workers: int) -> float:
    """How long the workers take for one round of every speaker's partial, batches shared out."""
    batch = min(speakers, max_batch)
    batches = speakers / batch
    return batches / min(workers, batches) * costs.partial(batch)


def serves(costs: Costs, speakers: int, finals_share: float, *, workers: int, max_batch: int, cadence: float) -> bool:
    """Whether ``speakers`` real-time speakers get their partials and finals within the bounds.
    ``finals_share`` is one speaker's finals' model time per second of speech."""
    bound = 2 * cadence
    batch = min(speakers, max_batch)
    partials = speakers * costs.partial(batch) / batch / bound  # worker-seconds a second
    finals = speakers * finals_share
    return partials + finals <= ROOM * workers and costs.partial(batch) <= bound


def capacity(costs: Costs, finals_share: float, *, workers: int, max_batch: int, cadence: float) -> int:
    """The most real-time speakers served within the bounds, on the LADDER (at least 1)."""
    def ok(n: int) -> bool:
        return serves(costs, n, finals_share, workers=workers, max_batch=max_batch, cadence=cadence)

    if not ok(1):
        return 1
    low, high = 1, LADDER[-1]
    while low < high:  # the largest n that is served: serving is monotonic in n
        middle = (low + high + 1) // 2
        low, high = (middle, high) if ok(middle) else (low, middle - 1)
    return on_ladder(low)


def within_bounds(costs: Costs, finals_share: float, *, workers: int, max_batch: int, cadence: float) -> bool:
    """Whether even one speaker is served within the bounds, a long utterance's final included
    (else: use a smaller model). Said once, of the prior: under load a final is slower for every
    speaker, which the finals' share already counts."""
    return (serves(costs, 1, finals_share, workers=workers, max_batch=max_batch, cadence=cadence)
            and costs.final(LONG_UTTERANCE) <= FINAL_BOUND)


def prior_finals_share(costs: Costs, typical: float = 10.0) -> float:
    """A speaker's finals' model time per second of speech before any final ran: a typical utterance's."""
    return costs.final(typical) / typical


def cadence_ms(costs: Costs, every_ms: int) -> int:
    """The slow cadence: as asked, or as fast as one speaker's partial allows, in 100 ms steps."""
    return max(every_ms, 100 * math.ceil(10 * costs.partial(1) / CADENCE_ROOM))


def largest_batch(costs: Costs, cadence: float, most: int) -> int:
    """The most windows one batch may hold and still return within ROOM of the cadence bound."""
    fits = [n for n in range(1, most + 1) if costs.partial(n) <= ROOM * 2 * cadence]
    return max(fits, default=1)


class LiveCosts:
    """The prior costs, scaled by the calls the server runs: the median, over the last LIVE_CALLS
    partial batches (or finals), of measured over predicted seconds. A speaker's finals' share is the
    median over recent finals of their model time per second of speech. Until LIVE_AFTER calls of
    a kind were seen, that kind keeps the prior."""

    def __init__(self, prior: Costs) -> None:
        self.prior = prior
        self._partials: deque[float] = deque(maxlen=LIVE_CALLS)
        self._finals: deque[float] = deque(maxlen=LIVE_CALLS)
        self._shares: deque[float] = deque(maxlen=LIVE_CALLS)
        # Read several times per partial of every session, changed once per model call: kept until then.
        self._costs: Costs | None = None
        self._share: float | None = None

    def partial_ran(self, rows: int, seconds: float) -> None:
        self._partials.append(seconds / self.prior.partial(rows))
        self._costs = self._share = None

    def final_ran(self, speech_seconds: float, seconds: float) -> None:
        if speech_seconds > 0:
            self._finals.append(seconds / self.prior.final(speech_seconds))
            self._shares.append(seconds / speech_seconds)
            self._costs = self._share = None

    @property
    def seen(self) -> dict[str, int]:
        return {"partial_batches": len(self._partials), "finals": len(self._finals)}

    def scale(self) -> tuple[float, float]:
        """Measured over predicted, for partials and finals (1.0 while too few were seen)."""
        return _median(self._partials), _median(self._finals)

    def costs(self) -> Costs:
        """The same object until the next call is recorded (Engine.capacity keeps its answer as long)."""
        if self._costs is None:
            self._costs = self.prior.scaled(*self.scale())
        return self._costs

    def finals_share(self) -> float:
        if self._share is None:
            self._share = prior_finals_share(self.costs()) if len(self._shares) < LIVE_AFTER else statistics.median(self._shares)
        return self._share


class RecentPartials:
    """Who asked for a partial lately, and how late recent partials came: what the load rules read
    (capacity, cadence, admission), a few times per partial of every session. Kept in order, so
    that what ages out leaves from the front and a read costs no more than what changed.
    Times are the event loop's, passed in (``now``)."""

    def __init__(self, streaming_seconds: float, lag_seconds: float, most: int = 4096) -> None:
        self.streaming_seconds = streaming_seconds
        self.lag_seconds = lag_seconds
        self._asked: dict[object, float] = {}  # requester -> its last ask, oldest ask first
        self._lags: deque[tuple[float, float, object]] = deque(maxlen=most)  # (when, lag, requester)
        self._sorted: list[float] | None = None  # the lags in order, until they change

    def asked(self, requester: object, now: float) -> None:
        self._asked.pop(requester, None)
        self._asked[requester] = now

    def streaming(self, now: float) -> dict[object, float]:
        """The requesters that asked within ``streaming_seconds`` (read-only: the dict itself)."""
        since = now - self.streaming_seconds
        while self._asked:
            requester, asked = next(iter(self._asked.items()))
            if asked >= since:
                break
            del self._asked[requester]
        return self._asked

    def answered(self, requester: object, lag: float, now: float) -> None:
        """A partial came ``lag`` seconds after it was asked for."""
        self._lags.append((now, lag, requester))
        self._sorted = None

    def lag(self, quantile: float, now: float) -> float:
        """A quantile of the lags of the last ``lag_seconds`` (0 with none)."""
        since = now - self.lag_seconds
        while self._lags and self._lags[0][0] < since:
            self._lags.popleft()
            self._sorted = None
        if self._sorted is None:
            self._sorted = sorted(lag for _, lag, _ in self._lags)
        lags = self._sorted
        return lags[int(quantile * (len(lags) - 1))] if lags else 0.0

    def forget(self, requester: object) -> None:
        """An ended session: neither streaming nor late any more."""
        self._asked.pop(requester, None)
        kept = [lag for lag in self._lags if lag[2] is not requester]
        if len(kept) < len(self._lags):
            self._lags.clear()
            self._lags.extend(kept)
            self._sorted = None


def _median(ratios: deque[float]) -> float:
    return statistics.median(ratios) if len(ratios) >= LIVE_AFTER else 1.0


def loaded(every_ms: int, *, lag: float, speakers: int, capacity: int) -> bool:
    """Whether the machine is more than half full: more than half the live ``capacity``
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
    alone_seconds: float = math.inf,
) -> float:
    """Seconds to the next partial: ``every_ms``, or a whole fraction of it near ``fast_ms`` while
    the speaker is ``speaking`` and the model has time for it. Fast partials cost ``every_ms / fast``
    times the model time, so they are taken while that many times the ``speakers`` streaming now
    fit the live ``capacity``, or while the speaker is alone and one partial takes less than the
    fast interval (``alone_seconds``), and while partials are not late (``lag``, request to text,
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
            if speakers * slow / interval <= capacity or speakers <= 1 and alone_seconds < interval:
                return interval
    return slow
