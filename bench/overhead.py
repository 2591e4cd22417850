"""The server's own cost: real-time streams on a model whose calls cost little.

    python -m bench --overhead                       # 8, 16, 32, 64, 128 streams, 30 s each
    python -m bench --overhead --levels 4,8 --sweep-seconds 10
    python -m bench --overhead --url 127.0.0.1:8716  # replicas behind HAProxy: streams held only
    python -m bench --overhead --replicas 2          # two replicas behind HAProxy, measured whole (bench/replicas.py)

The model is bench/shapes.py's "near-free" shape (random weights, one layer each side, 32 wide): its
calls cost a few ms of CPU a window (most of it the word alignment and the projection onto Whisper's
51,865 tokens, which no width takes away), counted apart as the model's; what the server spends
around them is its own work: VAD, log-mel features, the policy, the queue, the event loop, the JSON.
Each level streams the push-to-talk files in real time from every client and measures:

- whether the level holds the benchmark's bounds (no dropped stream, final p95 within 2 s, partial
  cadence p95 within twice the cadence);
- the server's CPU per stream-second of audio, in all and outside its model calls: the server
  process's CPU time, less the CPU of the threads the model computes on (/metrics
  ``stt_model_cpu_seconds``), per second of audio streamed, summed over the streams. The model calls'
  wall time (``stt_model_seconds``) is reported beside it but not subtracted: on a shared machine a
  call that waits for a core counts that wait too, and it also holds the server's own work inside a
  call (VAD and features of a partial window);
- the benchmark client's own CPU (it runs on the same cores: a client that took most of a core would
  be the bottleneck, not the server).

The levels go up until one gives. Figures go to bench/results/overhead-*.json and .md; the last line
on stdout is one JSON object: ``streams_held`` and ``server_cpu_ms_per_stream_second`` (at the
largest level held, else the first level) and every level's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path

from bench.data import Item, plans_for, push_to_talk
from bench.report import environment, pooled, utterance_figures
from bench.replicas import serve_replicas
from bench.server import Server, attach, health, model_cpu_seconds, model_seconds, serve
from bench.stream import run_streams

logger = logging.getLogger("bench")

MODEL = "random:near-free"
LEVELS = (8, 16, 32, 64, 128)


def _stream(url: str, plans: list[list[Item]], label: str) -> list:
    """The clients on uvloop where it is installed (it is with uvicorn[standard]): the client shares
    the cores with the server, and the plain loop costs it more."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(run_streams(url, plans, 1.0, label))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_streams(url, plans, 1.0, label))


def level(server: Server, items: list[Item], streams: int, seconds: float, partial_every: float) -> dict:
    """One level: ``streams`` real-time clients, each about ``seconds`` of audio."""
    plans = plans_for(items, streams, seconds)
    models_before, model_cpu_before, cpu_before = model_seconds(server), model_cpu_seconds(server), server.cpu_seconds()
    client_before, wall = time.process_time(), time.monotonic()
    utterances = _stream(server.url, plans, f"{streams} streams")
    wall = time.monotonic() - wall
    client_cpu = time.process_time() - client_before
    cpu_after, models_after, model_cpu = server.cpu_seconds(), model_seconds(server), model_cpu_seconds(server)
    wall_model = sum(s - models_before.get(kind, (0.0, 0.0))[0] for kind, (s, _) in models_after.items())
    calls = {kind: int(n - models_before.get(kind, (0.0, 0.0))[1]) for kind, (_, n) in models_after.items()}
    # The model's CPU where the server counts it; else its calls' wall time, which on a busy machine
    # also counts their waits for a core (and can exceed the server's CPU time). Behind a balancer
    # (--url) neither the servers' CPU nor their model's is seen whole: no CPU figure is made.
    model = model_cpu - model_cpu_before if model_cpu is not None and model_cpu_before is not None else wall_model
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    rows = [utterance_figures(u) for u in utterances]
    figures = pooled(rows, {i.name: i for i in items})
    audio = sum(r["duration_s"] for r in rows if "error" not in r)
    holds = (
        figures["dropped"] == 0
        and (figures["final_latency_p95_s"] or 0) <= 2.0
        and (figures["cadence_p95_s"] or 0) <= 2 * partial_every
    )
    partials = sum(r["partials"] for r in rows if "error" not in r)
    result = {
        "streams": streams,
        "holds": holds,
        "stream_seconds": round(audio, 1),
        "wall_s": round(wall, 1),
        "server_cpu_s": round(cpu, 2) if cpu is not None else None,
        "model_cpu_s": round(model, 2) if cpu is not None else None,
        "model_calls_wall_s": round(wall_model, 2) if cpu is not None else None,
        "model_calls": calls if cpu is not None else None,
        "server_cpu_ms_per_stream_second": round(1000 * (cpu - model) / audio, 2) if audio and cpu is not None else None,
        "server_cpu_all_ms_per_stream_second": round(1000 * cpu / audio, 2) if audio and cpu is not None else None,
        "server_cores_busy": round(cpu / wall, 2) if cpu is not None else None,
        "client_cpu_s": round(client_cpu, 2),
        "client_cores_busy": round(client_cpu / wall, 2),
        "partials_per_stream_second": round(partials / audio, 2) if audio else None,
        **{k: figures[k] for k in ("files", "dropped", "errors", "final_latency_p50_s", "final_latency_p95_s",
                                   "cadence_p50_s", "cadence_p95_s", "first_text_p50_s")},
    }
    logger.info(
        "%d streams: %s ms CPU per stream-second outside model calls (%s in all), server %s cores, client %.2f "
        "cores; final p95 %.2f s, cadence p95 %.2f s -> %s", streams, result["server_cpu_ms_per_stream_second"],
        result["server_cpu_all_ms_per_stream_second"], result["server_cores_busy"], result["client_cores_busy"],
        figures["final_latency_p95_s"] or 0, figures["cadence_p95_s"] or 0, "holds" if holds else "gives",
    )
    return result


def headline(levels: list[dict]) -> dict:
    """Streams held, and the cost at the largest level held (else at the first level run)."""
    held = [lv for lv in levels if lv["holds"]]
    at = held[-1] if held else (levels[0] if levels else {})
    return {
        "streams_held": at["streams"] if held else 0,
        "server_cpu_ms_per_stream_second": at.get("server_cpu_ms_per_stream_second"),
        "server_cpu_all_ms_per_stream_second": at.get("server_cpu_all_ms_per_stream_second"),
        "measured_at_streams": at.get("streams"),
        "client_cores_busy_max": max((lv["client_cores_busy"] for lv in levels), default=None),
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"### The server's own cost: {env['model']} (random weights, near-free calls), {env['cores']} cores, "
        f"{result['sweep_seconds']:g} s per stream per level"
        + (f", {env['replicas']} replicas behind HAProxy" if env.get("replicas", 1) > 1 else ""),
        "",
        "| streams | holds | CPU ms per stream-second outside model calls (in all) | server cores busy | client cores busy "
        "| final p50 / p95 | cadence p50 / p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in result["levels"]:
        lines.append(
            f"| {lv['streams']} | {'yes' if lv['holds'] else 'no'} | {lv['server_cpu_ms_per_stream_second']} "
            f"({lv['server_cpu_all_ms_per_stream_second']}) | {lv['server_cores_busy']} | {lv['client_cores_busy']} "
            f"| {lv['final_latency_p50_s'] or 0:.2f} / {lv['final_latency_p95_s'] or 0:.2f} s "
            f"| {lv['cadence_p50_s'] or 0:.2f} / {lv['cadence_p95_s'] or 0:.2f} s |"
        )
    head = result["headline"]
    lines += ["", f"Streams held: {head['streams_held']}; server CPU outside model calls: "
                  f"{head['server_cpu_ms_per_stream_second']} ms per stream-second (at {head['measured_at_streams']} streams)"]
    return "\n".join(lines) + "\n"


def run_overhead(args: argparse.Namespace, model_id: str, items: list[Item], env: dict[str, str], tag: str) -> None:
    tag = f"overhead-{tag}"
    levels_asked = [int(n) for n in args.levels.split(",")] if args.levels else list(LEVELS)
    env = {**env, "MAX_SESSIONS": str(max(256, 2 * max(levels_asked)))}
    items = push_to_talk(items)
    seconds = args.sweep_seconds
    levels: list[dict] = []
    log = args.out / f"{tag}-server.log"
    if args.replicas > 1:
        if not any(pair.startswith("CPU_THREADS=") for pair in args.env):
            env["CPU_THREADS"] = str(max(1, args.threads // args.replicas))
        serving = serve_replicas(model_id, env, args.replicas, log)
    else:
        serving = attach(args.url) if args.url else serve(model_id, env, log)
    with serving as server:
        server_health = health(server)
        partial_every = server_health["partial_every_ms"] / 1000
        for streams in levels_asked:
            levels.append(level(server, items, streams, seconds, partial_every))
            result = {
                "environment": {**environment(args, model_id, server_health), "url": args.url, "replicas": args.replicas,
                                "load_average": os.getloadavg()},
                "calibration": server_health.get("calibration") if args.replicas == 1 else None,  # one replica's
                "sweep_seconds": seconds,
                "levels": levels,
                "headline": headline(levels),
            }
            Path(args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
            if not levels[-1]["holds"]:
                break  # the next level would give too, and take longer
    table = markdown(result)
    (args.out / f"{tag}.md").write_text(table)
    print(table)
    print(json.dumps({**result["headline"], "levels": levels}, default=float))
