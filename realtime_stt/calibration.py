"""Start-up: load the model, time a few of the calls it will run, and choose the working values.

What is timed is only the prior for capacity (capacity.py): the server then scales it by the calls
it runs for its speakers. So the timing is short: a partial batch of one window and of a full
batch, on noise (a call's cost does not depend on what is said); the final's costs follow from the
same calls (the encoder's cost grows with its input's width, the decoder's with its tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel

from realtime_stt.capacity import (
    PARTIAL_TOKENS,
    TOKENS_PER_SECOND,
    Costs,
    cadence_ms,
    capacity,
    largest_batch,
    prior_finals_share,
    within_bounds,
)
from realtime_stt.decoder import BUSY_PARTIAL_ENCODER, N_FRAMES, Decoder, speech_chunks
from realtime_stt.model import device_of
from realtime_stt.features import MelFrames, log_mel, window_features
from realtime_stt.settings import SAMPLE_RATE, Settings

# A real final costs this many times the encode and tokens timed here: the VAD over the whole
# utterance, temperature fallback and the word alignment of real text come on top (the live finals
# cost 2.4-3.0 times the timed prediction in tiny.en's runs on 2 cores; bench/results/README.md).
FINAL_WORK = 2.5
PROBE_BATCH = {"cpu": 8, "cuda": 32}  # the batch calibration measures at, unless MAX_BATCH is set


@dataclass(frozen=True)
class Plan:
    """The working values calibration chose, and the capacity its timings predict (the prior)."""

    workers: int
    max_batch: int
    partial_every_ms: int
    capacity: int  # real-time speakers served within the bounds (at least 1: one is always admitted)
    within_bounds: bool  # False: even one speaker gets slower partials or finals than the bounds
    costs: Costs
    seconds: float  # how long the timing took

    def describe(self, model: str, device: str) -> str:
        """One line a person understands."""
        speakers = f"about {self.capacity} speaker{'s' if self.capacity != 1 else ''} in real time"
        if model.count("/") > 1:  # a local directory: its name, or its parent's where that says more
            parts = model.rstrip("/").split("/")
            model = "/".join(parts[-2:]) if parts[-1] in ("model", "models") else parts[-1]
        line = (
            f"{model} on {device}: {speakers} to start with (then as the live work shows), a partial every "
            f"{self.partial_every_ms / 1000:.1f} s, finals in about {self.costs.final(10.0):.1f} s "
            f"({self.workers} inference worker(s), batches of {self.max_batch})"
        )
        return line if self.within_bounds else line + "; slower than the bounds even for one speaker: use a smaller model"

    def as_dict(self) -> dict:
        return {
            "workers": self.workers,
            "max_batch": self.max_batch,
            "partial_every_ms": self.partial_every_ms,
            "capacity": self.capacity,
            "within_bounds": self.within_bounds,
            "predicted_partial_s": round(self.costs.partial(1), 3),
            "predicted_final_s": round(self.costs.final(10.0), 3),
            "measured": self.costs.as_dict(),
            "seconds": round(self.seconds, 2),
        }


def calibrate(settings: Settings) -> tuple[Decoder, Plan]:
    """Load the model, time it, and choose the working values; values the environment set win.

    On a CPU with two or more threads, and INFERENCE_WORKERS not set, two workers with half the
    threads each: Whisper's decoder steps gain little from threads, so two calls side by side nearly
    double the throughput, and the second worker keeps finals from waiting for partial batches. A
    model that serves one speaker at most that way is loaded again as one worker with every
    thread, for the fastest finals that one speaker can have.
    """
    device = device_of(settings)
    explicit = settings.explicit
    workers = settings.inference_workers or (2 if device == "cpu" and settings.cpu_threads >= 2 else 1)
    batch = settings.max_batch if "MAX_BATCH" in explicit else PROBE_BATCH.get(device, 8)
    began = time.perf_counter()
    decoder = Decoder(settings, workers)
    costs = measure(decoder, batch)
    chosen = plan(costs, settings, workers, batch, time.perf_counter() - began)
    if not settings.inference_workers and workers > 1 and chosen.capacity <= 1:
        decoder = None  # freed before the model loads again
        decoder = Decoder(settings, 1)
        chosen = replace(plan(costs, settings, 1, batch, chosen.seconds), seconds=time.perf_counter() - began)
    decoder.busy_span_always = costs.partial(1) > chosen.partial_every_ms / 1000
    return decoder, chosen


def plan(costs: Costs, settings: Settings, workers: int, batch: int, seconds: float) -> Plan:
    explicit = settings.explicit
    every_ms = settings.partial_every_ms if "PARTIAL_EVERY_MS" in explicit else cadence_ms(costs, settings.partial_every_ms)
    cadence = every_ms / 1000
    max_batch = settings.max_batch if "MAX_BATCH" in explicit else largest_batch(costs, cadence, batch)
    share = prior_finals_share(costs)
    return Plan(
        workers=workers,
        max_batch=max_batch,
        partial_every_ms=every_ms,
        capacity=capacity(costs, share, workers=workers, max_batch=max_batch, cadence=cadence),
        within_bounds=within_bounds(costs, share, workers=workers, max_batch=max_batch, cadence=cadence),
        costs=costs,
        seconds=seconds,
    )


def working_settings(settings: Settings, chosen: Plan) -> Settings:
    """The settings the server runs with: calibration's values where the environment set none
    (MAX_SESSIONS, when set, is a ceiling over the live capacity; it is not calibrated)."""
    return replace(settings, inference_workers=chosen.workers, max_batch=chosen.max_batch,
                   partial_every_ms=chosen.partial_every_ms)


def measure(decoder: Decoder, batch: int) -> Costs:
    """Time what a partial batch of one window and of ``batch`` windows costs, on noise, each the
    least of a few runs. Generation is forced to
    PARTIAL_TOKENS tokens by suppressing the end of text. A final is one encode of Whisper's 30 s
    window (the partial encode, scaled by its width) and a generate and alignment as long as its
    speech: TOKENS_PER_SECOND tokens a second."""
    model = decoder.model
    window = np.random.default_rng(0).normal(0.0, 0.05, 6 * SAMPLE_RATE).astype(np.float32)
    features = model.feature_extractor(window)[:, :-1]
    width = BUSY_PARTIAL_ENCODER.width(500)  # a loaded machine's 5 s window
    pairs = decoder.device == "cpu"  # on CPU partial batches are encoded two windows at a time

    def encode(rows: int) -> Any:
        padded = np.pad(features, ((0, 0), (0, width - features.shape[1])))
        return WhisperModel.encode(model, np.repeat(padded[None], rows, axis=0))

    tokenizer = decoder._tokenizer("transcribe", "en")
    prompt = model.get_prompt(tokenizer, list(range(1000, 1016)), without_timestamps=True)
    text = list(range(1000, 1000 + PARTIAL_TOKENS))

    def generate(encoded: Any, rows: int) -> Any:
        return model.model.generate(
            encoded, [prompt] * rows, beam_size=1, max_length=len(prompt) + PARTIAL_TOKENS,
            suppress_tokens=[-1, tokenizer.eot], return_scores=True, return_no_speech_prob=True,
        )

    one = encode(1)  # the first encode and generate pay for lazy initialisation: not timed
    generate(one, 1)
    # The generate and alignment of a full batch read a batch of encoder outputs: on CPU the one
    # window's, repeated (encoding a batch there would time what the encode above already did).
    many = ctranslate2.StorageView.from_array(np.repeat(np.asarray(one), batch, axis=0)) if pairs else encode(batch)
    # A final scores and computes features of its whole audio; a partial window takes both from what
    # its session kept as the audio came (features.py), which leaves the features' edges to compute.
    vad_features = _seconds(lambda: (speech_chunks(window), model.feature_extractor(window)))
    filters = model.feature_extractor.mel_filters
    mel = MelFrames(filters)
    mel.add(log_mel(mel.frames_to_add(window, 0), filters))
    kept = mel.snapshot()
    kept_features = _seconds(lambda: window_features(kept, window, 0, [(0, window.size)], filters))
    encode_1 = _seconds(lambda: encode(1))
    encode_many = _seconds(lambda: encode(2)) * math.ceil(batch / 2) if pairs else _seconds(lambda: encode(batch))
    generate_1, generate_many = _seconds(lambda: generate(one, 1)), _seconds(lambda: generate(many, batch))
    align_1 = _seconds(lambda: model.find_alignment(tokenizer, [text], one, [500]))
    align_many = _seconds(lambda: model.find_alignment(tokenizer, [text] * batch, many, [500] * batch))
    partial_1 = kept_features + encode_1 + generate_1 + align_1
    partial_many = batch * kept_features + encode_many + generate_many + align_many
    row = max(0.0, (partial_many - partial_1) / (batch - 1)) if batch > 1 else partial_1
    per_token = (generate_1 + align_1) / PARTIAL_TOKENS
    return Costs(
        partial_fixed=max(0.0, partial_1 - row),
        partial_row=row,
        final_fixed=FINAL_WORK * encode_1 * N_FRAMES / width,
        final_per_second=FINAL_WORK * (TOKENS_PER_SECOND * per_token + vad_features / 6),
    )


def _seconds(call: Callable[[], Any], *, most: int = 3, budget: float = 0.25) -> float:
    """Wall time of a call: the least of up to ``most`` runs, as many as fit in ``budget`` seconds
    (at least one). The least, as what else runs on the machine only ever adds to a call's time:
    the live costs then scale it to the machine as it is."""
    times: list[float] = []
    while not times or (len(times) < most and sum(times) < budget):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)
