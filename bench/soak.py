"""Soak: back-to-back real-time utterances on N streams for M minutes, with the server's memory,
descriptors, threads and asyncio tasks sampled every 10 s and latency taken minute by minute.

    python -m bench --model tiny.en --streams 8 --soak 30

The verdict compares the start (after the first ``window`` minutes, 5 or a third of the run) with
the end: RSS growth, descriptors, threads and tasks, and final and cadence p95 of the first window
against the last (pooled over every utterance in each). Utterances are push-to-talk length: files
over 30 s are left out, or the long-form ones' finals, which every client reaches at about the same
minute, would make a minute's p95 a matter of which file came up.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import statistics
import time
import urllib.request
from pathlib import Path

from bench.data import Item, push_to_talk
from bench.metrics import percentile
from bench.server import Server
from bench.stream import REFUSED, Utterance, stream_file

logger = logging.getLogger("bench")

SAMPLE_SECONDS = 10.0


async def _client(url: str, items: list[Item], offset: int, until: float, done: list[Utterance], auto_language: bool,
                  reconnect: bool = False) -> None:
    if reconnect:
        await _push_to_talk_client(url, items, offset, until, done, auto_language)
        return
    import websockets

    try:
        async with websockets.connect(f"ws://{url}/ws", max_size=None) as ws:
            for item in itertools.islice(itertools.cycle(items), offset, None):
                if time.monotonic() >= until:
                    return
                done.append(await stream_file(ws, item, 1.0, auto_language))
    except Exception as exc:  # a dropped connection is a figure of the soak
        logger.warning("soak client dropped: %s", exc)
        done.append(Utterance(items[offset % len(items)], error=f"{type(exc).__name__}: {exc}"))


async def _push_to_talk_client(url: str, items: list[Item], offset: int, until: float, done: list[Utterance],
                               auto_language: bool) -> None:
    """A new socket for each utterance, opened as soon as the last final arrives (the last socket
    closes meanwhile), as a push-to-talk client does; a refusal (1013) is a figure, not the end."""
    import websockets

    closing: set[asyncio.Task] = set()
    for item in itertools.islice(itertools.cycle(items), offset, None):
        if time.monotonic() >= until:
            break
        try:
            ws = await websockets.connect(f"ws://{url}/ws", max_size=None)
            done.append(await stream_file(ws, item, 1.0, auto_language))
        except websockets.ConnectionClosed as exc:
            refused = exc.rcvd is not None and exc.rcvd.code == 1013
            done.append(Utterance(item, error=f"{REFUSED if refused else ''}{type(exc).__name__}: {exc}"))
            await asyncio.sleep(1.0)  # a refused client tries again a moment later
            continue
        except Exception as exc:  # a dropped connection is a figure of the soak
            logger.warning("soak client dropped: %s", exc)
            done.append(Utterance(item, error=f"{type(exc).__name__}: {exc}"))
            continue
        task = asyncio.create_task(ws.close())
        closing.add(task)
        task.add_done_callback(closing.discard)
    await asyncio.gather(*closing, return_exceptions=True)


def _asyncio_tasks(url: str) -> float | None:
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("stt_asyncio_tasks "):
                return float(line.split()[1])
    return None


async def _sampler(server: Server, began: float, until: float, samples: list[dict]) -> None:
    import psutil

    process = psutil.Process(server.process.pid)
    while True:
        tasks = await asyncio.to_thread(_asyncio_tasks, server.url)
        samples.append({
            "t_s": round(time.monotonic() - began, 1),
            "rss_mb": process.memory_info().rss / 2**20,
            "fds": process.num_fds(),
            "threads": process.num_threads(),
            "asyncio_tasks": tasks,
        })
        if time.monotonic() >= until:
            return
        await asyncio.sleep(min(SAMPLE_SECONDS, max(0.0, until - time.monotonic())))


def soak(server: Server, items: list[Item], streams: int, minutes: float, auto_language: bool = False,
         reconnect: bool = False) -> dict:
    """Run the soak; its samples, per-minute latency and verdict."""
    utterances: list[Utterance] = []
    samples: list[dict] = []
    items = push_to_talk(items)

    async def run() -> float:
        began = time.monotonic()
        until = began + minutes * 60
        sampler = asyncio.create_task(_sampler(server, began, until, samples))
        await asyncio.gather(*(_client(server.url, items, k, until, utterances, auto_language, reconnect)
                               for k in range(streams)))
        await sampler
        return began

    began = asyncio.run(run())
    return {
        "samples": samples,
        "per_minute": [{"minute": m + 1, **_latency(_between(utterances, began, 60 * m, 60 * (m + 1)))}
                       for m in range(_minutes(utterances, began, minutes))],
        "verdict": verdict(samples, utterances, began, minutes),
    }


def _minutes(utterances: list[Utterance], began: float, minutes: float) -> int:
    last = max((u.stop_sent - began for u in utterances if u.final), default=0.0)
    return max(math.ceil(minutes), math.floor(last / 60) + 1)


def _between(utterances: list[Utterance], began: float, start: float, end: float) -> list[Utterance]:
    """The utterances whose stop was sent from ``start`` to ``end`` seconds into the soak."""
    return [u for u in utterances if u.final and start <= u.stop_sent - began < end]


def _latency(these: list[Utterance]) -> dict:
    latency = [_final_time(u) - u.stop_sent for u in these]
    cadence = [b - a for u in these for a, b in itertools.pairwise(t for t, m in u.of_type("partial") if t <= u.stop_sent)]
    return {
        "utterances": len(these),
        "final_p50_s": percentile(latency, 50),
        "final_p95_s": percentile(latency, 95),
        "cadence_p50_s": percentile(cadence, 50),
        "cadence_p95_s": percentile(cadence, 95),
        "errors": sum(len(u.of_type("error")) for u in these),
    }


def _final_time(u: Utterance) -> float:
    return next(t for t, m in u.messages if m.get("type") == "final")


def growth(samples: list[dict], window: float, minutes: float) -> dict:
    """Growth of each resource from the window after the first (once the allocator and caches have
    warmed) to the last window: RSS as the mean of each window (it saws up and down by 15 % within
    a minute as utterances come and go), counts as each window's peak (a single sample caught a
    socket in the middle of a reconnect)."""
    def values(key: str, start: float, end: float) -> list[float]:
        return [s[key] or 0 for s in samples if start * 60 <= s["t_s"] < end * 60] or [samples[-1][key] or 0]

    def peak(key: str, start: float, end: float) -> float:
        return max(values(key, start, end))

    early, late = (window, 2 * window), (minutes - window, minutes + 60)
    rss_early, rss_late = (statistics.mean(values("rss_mb", *span)) for span in (early, late))
    return {
        "rss_growth": (rss_late - rss_early) / rss_early,
        "fds_growth": peak("fds", *late) - peak("fds", *early),
        "threads_growth": peak("threads", *late) - peak("threads", *early),
        "tasks_growth": peak("asyncio_tasks", *late) - peak("asyncio_tasks", *early),
    }


def verdict(samples: list[dict], utterances: list[Utterance], began: float, minutes: float) -> dict:
    """The soak's targets: from the window after the first to the last, RSS grows < 5 %,
    descriptors, threads and tasks not at all; the last window's final and cadence p95 are within
    10 % of the first's; no error."""
    window = min(5.0, minutes / 3)
    first = _latency(_between(utterances, began, 0, window * 60))
    last = _latency(_between(utterances, began, (minutes - window) * 60, minutes * 60 + 3600))
    result = {"window_minutes": window, **growth(samples, window, minutes)}
    result |= {
        "final_p95_first_s": first["final_p95_s"],
        "final_p95_last_s": last["final_p95_s"],
        "cadence_p95_first_s": first["cadence_p95_s"],
        "cadence_p95_last_s": last["cadence_p95_s"],
        "utterances": sum(1 for u in utterances if u.final),
        "errors": sum(len(u.of_type("error")) for u in utterances)
        + sum(1 for u in utterances if u.error and not u.error.startswith(REFUSED)),
        "refused": sum(1 for u in utterances if u.error and u.error.startswith(REFUSED)),
    }
    latency_held = all(
        result[f"{k}_last_s"] is not None and result[f"{k}_first_s"] and result[f"{k}_last_s"] <= 1.1 * result[f"{k}_first_s"]
        for k in ("final_p95", "cadence_p95")
    )
    result["holds"] = (
        result["rss_growth"] < 0.05
        and result["fds_growth"] <= 0
        and result["threads_growth"] <= 0
        and result["tasks_growth"] <= 0
        and latency_held
        and result["errors"] == 0
        and result["refused"] == 0
    )
    return result


def markdown(result: dict, title: str) -> str:
    v = result["verdict"]
    lines = [
        f"### Soak: {title}", "",
        "| figure | value |", "|---|---|",
        f"| utterances / errors / refused with 1013 | {v['utterances']} / {v['errors']} / {v.get('refused', 0)} |",
        f"| RSS growth after the first {v['window_minutes']:.2g} min | {100 * v['rss_growth']:.1f} % |",
        f"| descriptors / threads / asyncio tasks growth | {v['fds_growth']} / {v['threads_growth']} / {v['tasks_growth']:g} |",
        f"| final p95, first / last {v['window_minutes']:.2g} min | {_s(v['final_p95_first_s'])} / {_s(v['final_p95_last_s'])} |",
        f"| cadence p95, first / last {v['window_minutes']:.2g} min | {_s(v['cadence_p95_first_s'])} / {_s(v['cadence_p95_last_s'])} |",
        f"| holds (RSS < 5 %, no growth, latency within 10 %, no error) | {'yes' if v['holds'] else 'no'} |",
        "", "| minute | utterances | final p50 | final p95 | cadence p50 | cadence p95 |", "|---|---|---|---|---|---|",
    ]
    for m in result["per_minute"]:
        lines.append(f"| {m['minute']} | {m['utterances']} | {_s(m['final_p50_s'])} | {_s(m['final_p95_s'])} | "
                     f"{_s(m['cadence_p50_s'])} | {_s(m['cadence_p95_s'])} |")
    return "\n".join(lines) + "\n"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    minutes = [s["t_s"] / 60 for s in samples]
    figure, (memory, counts, latency) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    memory.plot(minutes, [s["rss_mb"] for s in samples], label="RSS (MB)")
    memory.set_ylabel("MB")
    memory.legend()
    for key in ("fds", "threads", "asyncio_tasks"):
        counts.plot(minutes, [s[key] or 0 for s in samples], label=key)
    counts.legend()
    rows = result["per_minute"]
    for key, style in (("final_p95_s", "o-"), ("cadence_p95_s", "s-"), ("final_p50_s", "o--"), ("cadence_p50_s", "s--")):
        latency.plot([r["minute"] - 0.5 for r in rows], [r[key] or 0 for r in rows], style, label=key)
    latency.set_ylabel("seconds")
    latency.set_xlabel("minutes")
    latency.legend()
    memory.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(result: dict, out: Path, tag: str, title: str, environment: dict) -> str:
    (out / f"{tag}.json").write_text(json.dumps({"environment": environment, **result}, indent=1, default=float))
    table = markdown(result, title)
    (out / f"{tag}.md").write_text(table)
    try:
        plot(result, out / f"{tag}.png", title)
    except ImportError:
        logger.warning("no plot of the soak: matplotlib is not installed (pip install matplotlib)")
    return table
