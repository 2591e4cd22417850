"""Figures of a run: per file, pooled, the offline reference, and the JSON, markdown and plot."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench.data import Item, read_pcm
from bench.metrics import committed_revisions, coverage, error_rate, flicker, percentile, word_latency
from bench.stream import Utterance


def utterance_figures(u: Utterance, words: list[tuple[str, float, float]] | None = None, speed: float = 1.0) -> dict:
    """One file's figures; times are the client's monotonic clock at send or arrival.

    - final_latency_s: stop frame sent -> final message received.
    - cadence_s (and its p50/p95): intervals between successive partials received before stop was
      sent, i.e. while audio flowed (partials arriving after stop are left out of every partial figure).
    - first_partial_s / first_text_s: first audio frame sent -> first partial / first non-empty partial.
    - rewrites, strict_rewrites, updates: metrics.flicker over the partial texts.
    - covered / final_units: metrics.coverage of the final by the last partial before stop.
    - committed_revisions: metrics.committed_revisions over the partials' `committed` (0 if absent).
    - wer_final / wer_last_partial: this file alone (None for references that are an engine's output).
    - word_shown_s / word_committed_s: metrics.word_latency against ``words``, the offline decode's
      (text, start, end) in audio seconds (played at ``speed``); None for a word no partial showed.
    - first_words_s: the first partial with text, from when the first word began (``offline``: where
      Silero first hears speech, if Whisper's alignment puts it earlier).
    """
    partials = u.of_type("partial")
    final = u.final
    figures: dict = {"file": u.item.name, "language": u.item.language, "duration_s": u.item.sent_seconds}
    if final is None:
        return {**figures, "error": u.error or "no final", "errors": len(u.of_type("error"))}
    before_stop = [(t, m) for t, m in partials if t <= u.stop_sent]
    arrivals = [t for t, _ in before_stop]
    texts = [m["text"] for _, m in before_stop]
    last = texts[-1] if texts else ""
    rewrites, strict, updates = flicker(texts, u.item.language)
    matched, total = coverage(final["text"], last, u.item.language)
    first_text = next((t for t, m in partials if m["text"]), None)
    cadence = [round(float(c), 4) for c in np.diff(arrivals)]
    scored = [(u.item.reference, final["text"], u.item.language)] if u.item.scored else []
    timed = [(w, start / speed, end / speed) for w, start, end in words or []]
    shown, committed = word_latency(
        timed, [(t - u.first_audio, m.get("committed", ""), m["text"]) for t, m in before_stop], u.item.language
    )
    return {
        **figures,
        "final_latency_s": final_time(u) - u.stop_sent,
        "cadence_p50_s": percentile(cadence, 50),
        "cadence_p95_s": percentile(cadence, 95),
        "cadence_s": cadence,
        "first_partial_s": arrivals[0] - u.first_audio if arrivals else None,
        "first_text_s": first_text - u.first_audio if first_text else None,
        "first_words_s": first_text - u.first_audio - timed[0][1] if first_text and timed else None,
        "word_shown_s": [None if s is None else round(s, 4) for s in shown],
        "word_committed_s": [None if c is None else round(c, 4) for c in committed],
        "partials": len(texts),
        "rewrites": rewrites,
        "strict_rewrites": strict,
        "updates": updates,
        "covered": matched,
        "final_units": total,
        "committed_revisions": committed_revisions([m.get("committed", "") for _, m in partials]),
        "wer_final": error_rate(scored),
        "wer_last_partial": error_rate([(r, last, lang) for r, _, lang in scored]),
        "final": final["text"],
        "last_partial": last,
        "errors": len(u.of_type("error")),
    }


def predicted(calibration: dict, rows: list[dict], streams: int) -> dict:
    """What start-up calibration predicts for this run: a round of the streams' partials (the
    cadence, when longer than PARTIAL_EVERY_MS), and the final latency p50 over these files'
    durations (model time alone, nothing queued)."""
    from realtime_stt.capacity import Costs, round_seconds

    costs = Costs(**calibration["measured"])
    rounds = round_seconds(costs, streams, max_batch=calibration["max_batch"], workers=calibration["workers"])
    finals = [costs.final(r["duration_s"]) for r in rows if "error" not in r]
    return {"cadence_p95_s": max(calibration["partial_every_ms"] / 1000, rounds),
            "final_latency_p50_s": percentile(finals, 50)}


def final_time(u: Utterance) -> float:
    return next(t for t, m in u.messages if m.get("type") == "final")


def pooled(rows: list[dict], items: dict[str, Item]) -> dict:
    """Figures pooled over files: percentiles over every file's values (every cadence interval),
    flicker = all rewrites / all updates, coverage = all covered / all final units, WER pooled by
    jiwer over the scored files (errors / reference words), word latency over every spoken word
    that a partial showed (committed: that a partial committed), with the share of spoken words
    shown before the stop. A file without a final is dropped."""
    ok = [r for r in rows if "error" not in r]
    cadence = [c for r in ok for c in r["cadence_s"]]
    latency = [r["final_latency_s"] for r in ok]
    first = [r["first_text_s"] for r in ok if r["first_text_s"] is not None]
    first_partial = [r["first_partial_s"] for r in ok if r["first_partial_s"] is not None]
    scored = [r for r in ok if items[r["file"]].scored]
    updates = sum(r["updates"] for r in ok)
    spoken = [s for r in ok for s in r.get("word_shown_s", [])]
    shown = [s for s in spoken if s is not None]
    committed = [c for r in ok for c in r.get("word_committed_s", []) if c is not None]
    first_words = [r["first_words_s"] for r in ok if r.get("first_words_s") is not None]
    return {
        "files": len(rows),
        "dropped": len(rows) - len(ok),
        "errors": sum(r["errors"] for r in rows),
        "final_latency_p50_s": percentile(latency, 50),
        "final_latency_p95_s": percentile(latency, 95),
        "cadence_p50_s": percentile(cadence, 50),
        "cadence_p95_s": percentile(cadence, 95),
        "first_partial_p50_s": percentile(first_partial, 50),
        "first_partial_p95_s": percentile(first_partial, 95),
        "first_text_p50_s": percentile(first, 50),
        "first_text_p95_s": percentile(first, 95),
        "word_shown_p50_s": percentile(shown, 50),
        "word_shown_p95_s": percentile(shown, 95),
        "word_committed_p50_s": percentile(committed, 50),
        "word_committed_p95_s": percentile(committed, 95),
        "words_shown_before_stop": len(shown) / len(spoken) if spoken else None,
        "first_words_p50_s": percentile(first_words, 50),
        "first_words_p95_s": percentile(first_words, 95),
        "flicker": sum(r["rewrites"] for r in ok) / updates if updates else None,
        "flicker_strict": sum(r["strict_rewrites"] for r in ok) / updates if updates else None,
        "coverage": sum(r["covered"] for r in ok) / max(1, sum(r["final_units"] for r in ok)),
        "committed_revisions": sum(r["committed_revisions"] for r in ok),
        "wer_final": error_rate([(items[r["file"]].reference, r["final"], r["language"]) for r in scored]),
        "wer_last_partial": error_rate([(items[r["file"]].reference, r["last_partial"], r["language"]) for r in scored]),
    }


def offline(model_id: str, items: list[Item], threads: int, compute_type: str, device: str = "cpu") -> dict:
    """Plain faster-whisper on whole files, with word timestamps: the reference for accuracy, compute
    and when each word was spoken.

    cpu_s is the bench process's CPU time (all threads) spent in transcribe, comparable with the
    server's CPU seconds on a CPU machine (on a GPU it leaves out the GPU's work)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(model_id, device=device, compute_type=compute_type, cpu_threads=threads)
    texts, words, seconds = {}, {}, 0.0
    for item in items:
        audio = np.frombuffer(read_pcm(item.path), dtype="<i2").astype(np.float32) / 32768
        start = time.process_time()
        segments, _ = model.transcribe(audio, language=item.language, beam_size=1, vad_filter=True, word_timestamps=True)
        segments = list(segments)
        seconds += time.process_time() - start
        texts[item.name] = " ".join(s.text.strip() for s in segments)
        words[item.name] = [(w.word, w.start, w.end) for s in segments for w in s.words or []]
        if words[item.name]:
            # The VAD filter pads speech by 400 ms, and Whisper aligns the first word to where the
            # padded speech starts: up to 0.4 s before anyone spoke. Speech begins where Silero hears it.
            word, start, end = words[item.name][0]
            words[item.name][0] = (word, min(max(start, speech_onset(audio)), end), end)
    scored = [i for i in items if i.scored]
    return {
        "cpu_s": seconds,
        "wer": error_rate([(i.reference, texts[i.name], i.language) for i in scored]),
        "texts": texts,
        "words": words,
    }


def speech_onset(audio: np.ndarray) -> float:
    """Seconds to the first speech Silero hears in ``audio`` (faster-whisper's VAD, unpadded); 0 for none.

    At a threshold of 0.2, not the VAD filter's 0.5: on clean read speech both agree with the rise
    in level within 40 ms, but 0.5 heard whispered and falsetto speech begin 0.2-0.5 s late."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    chunks = get_speech_timestamps(audio, VadOptions(threshold=0.2, speech_pad_ms=0))
    return chunks[0]["start"] / 16000 if chunks else 0.0


def environment(args: argparse.Namespace, model_id: str, server_health: dict) -> dict:
    import ctranslate2
    import faster_whisper

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "model": args.model,
        "model_id": model_id,
        "compute_type": args.compute_type,
        "device": server_health.get("device"),
        "partial_every_ms": server_health.get("partial_every_ms"),
        "threads": args.threads,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ctranslate2": ctranslate2.__version__,
        "faster_whisper": faster_whisper.__version__,
        "speed": args.speed,
        "streams": args.streams,
        "protocol": getattr(args, "protocol", "ws"),
        "stop_after_s": getattr(args, "stop_after", None),
        "auto_language": args.auto_language,
        "server_settings": args.env,
        "server_inference": server_health.get("inference"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fmt(value, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{unit}"


def markdown(result: dict) -> str:
    env, run = result["environment"], result["run"]
    lines = [
        f"### {env['model']} ({env['compute_type']}, {env['threads']} threads, {env['cpu']}, {env['cores']} cores), "
        f"{run['files']} files, {env['streams']} stream(s) at {env['speed']}x"
        + (", no language sent" if env.get("auto_language") else "")
        + (" over OpenAI's Realtime API" if env.get("protocol") == "realtime" else "")
        + (f", stop {env['stop_after_s']:g} s after the last word" if env.get("stop_after_s") is not None else "")
        + (" (random weights: timing only, its text is noise)" if str(env["model"]).startswith("random:") else ""),
        "",
        "| figure | value |",
        "|---|---|",
        f"| final latency p50 / p95 | {_fmt(run['final_latency_p50_s'], ' s')} / {_fmt(run['final_latency_p95_s'], ' s')} |",
        f"| partial cadence p50 / p95 | {_fmt(run['cadence_p50_s'], ' s')} / {_fmt(run['cadence_p95_s'], ' s')} |",
        f"| first partial p50 / p95 | {_fmt(run['first_partial_p50_s'], ' s')} / {_fmt(run['first_partial_p95_s'], ' s')} |",
        f"| first partial with text p50 / p95 | {_fmt(run['first_text_p50_s'], ' s')} / {_fmt(run['first_text_p95_s'], ' s')} |",
        f"| word shown p50 / p95 (committed) | {_fmt(run.get('word_shown_p50_s'), ' s')} / {_fmt(run.get('word_shown_p95_s'), ' s')} "
        f"({_fmt(run.get('word_committed_p50_s'), ' s')} / {_fmt(run.get('word_committed_p95_s'), ' s')}) |",
        f"| words shown before the stop | {_fmt(run.get('words_shown_before_stop'), ' %', 100, 1)} |",
        f"| first words after speech began p50 / p95 | {_fmt(run.get('first_words_p50_s'), ' s')} / {_fmt(run.get('first_words_p95_s'), ' s')} |",
        f"| flicker (strict) | {_fmt(run['flicker'], ' %', 100, 1)} ({_fmt(run['flicker_strict'], ' %', 100, 1)}) |",
        f"| last partial covers final | {_fmt(run['coverage'], ' %', 100, 1)} |",
        f"| committed text revised | {run['committed_revisions']} |",
        f"| WER final / last partial | {_fmt(run['wer_final'], ' %', 100, 1)} / {_fmt(run['wer_last_partial'], ' %', 100, 1)} |",
        f"| offline WER (plain faster-whisper) | {_fmt(run.get('offline_wer'), ' %', 100, 1)} |",
        f"| WER delta vs offline | {_fmt(run.get('wer_delta_points'), ' points')} |",
        f"| server CPU s per audio s | {_fmt(run['cpu_per_audio_s'], '', 1, 3)} |",
        f"| compute ratio vs offline | {_fmt(run.get('compute_ratio'), 'x')} |",
        f"| peak RSS | {_fmt(run['peak_rss_mb'], ' MB', 1, 0)} |",
        f"| errors / dropped | {run['errors']} / {run['dropped']} |",
    ]
    if result["sweep"]:
        lines += ["", "| streams | final p50 | final p95 | cadence p50 | cadence p95 | first text p50 | word shown p50 | word shown p95 "
                      "| CPU s / audio s | holds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for level in result["sweep"]:
            lines.append(
                f"| {level['streams']} | {_fmt(level['final_latency_p50_s'])} | {_fmt(level['final_latency_p95_s'])} | "
                f"{_fmt(level['cadence_p50_s'])} | {_fmt(level['cadence_p95_s'])} | {_fmt(level['first_text_p50_s'])} | "
                f"{_fmt(level.get('word_shown_p50_s'))} | {_fmt(level.get('word_shown_p95_s'))} | "
                f"{_fmt(level['cpu_per_audio_s'], '', 1, 3)} | {'yes' if level['holds'] else 'no'} |"
            )
        least = "" if result.get("sweep_finished", True) else "at least "
        lines += ["", f"Streams per machine: {least}**{result['streams_per_machine']}** "
                      "(final p95 <= 2 s and cadence p95 <= 2x PARTIAL_EVERY_MS)"
                      + ("" if not least else "; the sweep stopped before it finished")]
    calibration = result.get("calibration")
    if calibration:
        per_call = run.get("model_seconds_per_call") or {}
        lines += ["", f"Calibration at start-up: {calibration['summary']}", "",
                  f"Model time per call, measured in the main run (predicted at start-up): partial batch "
                  f"{_fmt(per_call.get('partial'), ' s')} ({calibration['predicted_partial_s']:.2f} s for one speaker), "
                  f"final {_fmt(per_call.get('final'), ' s')} ({calibration['predicted_final_s']:.2f} s for 10 s of speech)"]
        calls = run.get("model_calls") or {}
        if calls:
            lines += [f"Model calls in the main run: {calls.get('final', 0)} final decodes after a stop (with any re-read "
                      f"of skipped speech), {calls.get('speculative', 0)} started before one"]
        expected = run.get("predicted") or {}
        if expected:
            lines += [f"Against the calibration's prediction for this run: cadence p95 {_fmt(run['cadence_p95_s'], ' s')} "
                      f"(predicted {_fmt(expected['cadence_p95_s'], ' s')}), final p50 {_fmt(run['final_latency_p50_s'], ' s')} "
                      f"(predicted {_fmt(expected['final_latency_p50_s'], ' s')})"]
        live = result.get("capacity") or {}
        if live:
            lines += [f"Capacity: {calibration['capacity']} at start-up (the prior), {live.get('live')} live at the end "
                      f"(scale of the prior's costs: {live.get('scale')})"]
        if result["sweep"] and result["streams_per_machine"]:
            ratio = calibration["capacity"] / result["streams_per_machine"]
            lines += [f"Calibrated capacity {calibration['capacity']} against {result['streams_per_machine']} measured: "
                      f"{100 * (ratio - 1):+.0f} %"]
    return "\n".join(lines) + "\n"


def plot(levels: list[dict], path: Path, partial_every: float, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [level["streams"] for level in levels]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label, style in [
        ("final_latency_p50_s", "final latency p50", "o-"),
        ("final_latency_p95_s", "final latency p95", "o--"),
        ("cadence_p50_s", "partial cadence p50", "s-"),
        ("cadence_p95_s", "partial cadence p95", "s--"),
    ]:
        axis.plot(streams, [level[key] or 0 for level in levels], style, label=label)
    axis.axhline(2.0, color="grey", linewidth=0.8, linestyle=":")
    axis.axhline(2 * partial_every, color="grey", linewidth=0.8, linestyle="-.")
    axis.set_xscale("log", base=2)
    axis.set_xticks(streams, [str(s) for s in streams])
    axis.set_xlabel("concurrent real-time streams")
    axis.set_ylabel("seconds")
    axis.set_title(f"{model}: latency and cadence vs streams")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
