"""Benchmark: start the server, stream real speech over real WebSockets, and measure it.

    python -m bench --model tiny.en              # every English file, 1 stream, real time
    python -m bench --model base --sweep         # + capacity sweep 1, 2, 4, 8... streams
    python -m bench --url 127.0.0.1:8716 --sweep # the same against servers already running (HAProxy)
    python -m bench --model tiny.en --upload-minutes 10 --streams 4   # live streams beside an upload
    python -m bench --model tiny.en --protocol realtime   # through OpenAI's Realtime API (/v1/realtime)

Figures (per file and pooled) go to bench/results/ as JSON, a markdown table and, after a sweep, a
PNG plot. The same model decodes the same files offline with plain faster-whisper (whole file, VAD,
greedy) in the same run: its WER and compute time are the reference the server is judged against.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.data import DEFAULT_MANIFEST, ROOT, Item, load_manifest, plans_for, push_to_talk, resolve_model, with_stop_after
from bench.overhead import MODEL as OVERHEAD_MODEL
from bench.overhead import run_overhead
from bench.report import environment, markdown, offline, plot, pooled, predicted, utterance_figures
from bench.server import Server, attach, health, model_calls, model_seconds, model_time_per_call, serve
from bench.soak import soak
from bench.soak import write as write_soak
from bench.stream import REFUSED, measure
from bench.upload import run_upload

logger = logging.getLogger("bench")


def sweep(server: Server, items: list[Item], args: argparse.Namespace, partial_every: float, spoken: dict,
          measured: Callable[[list[dict]], object]) -> list[dict]:
    """1, 2, 4... real-time streams, each about --sweep-seconds of audio, until latency or cadence
    gives; then halfway between the last that held and the first that gave, down to steps of a
    quarter of the last that held, so that streams per machine is known to about 25 %. ``measured``
    gets the levels so far after each one."""
    levels: list[dict] = []

    def holds(streams: int) -> bool:
        measured_now = level(server, items, args, partial_every, streams, spoken)
        levels.append(measured_now)
        levels.sort(key=lambda lv: lv["streams"])
        measured(levels)
        return measured_now["holds"]

    streams = 1
    while streams <= args.max_streams and holds(streams):
        streams *= 2
    held = max((lv["streams"] for lv in levels if lv["holds"]), default=0)
    gave = min((lv["streams"] for lv in levels if not lv["holds"]), default=0)
    while held and gave and gave - held > max(1, held // 4):
        middle = (held + gave) // 2
        held, gave = (middle, gave) if holds(middle) else (held, middle)
    return levels


def level(server: Server, items: list[Item], args: argparse.Namespace, partial_every: float, streams: int, spoken: dict) -> dict:
    """One sweep level: ``streams`` real-time clients, each about --sweep-seconds of audio."""
    plans = plans_for(push_to_talk(items), streams, args.sweep_seconds)
    utterances, cpu, _ = measure(server, plans, 1.0, f"{streams} streams", args.auto_language, args.protocol)
    rows = [utterance_figures(u, spoken.get(u.item.name)) for u in utterances]
    figures = pooled(rows, {i.name: i for i in items})
    audio = sum(r["duration_s"] for r in rows if "error" not in r)
    cpu_per_audio = cpu / audio if audio and cpu is not None else None
    holds = (
        figures["dropped"] == 0
        and (figures["final_latency_p95_s"] or 0) <= 2.0
        and (figures["cadence_p95_s"] or 0) <= 2 * partial_every
    )
    logger.info("%d streams: final p95 %.2f s, cadence p95 %.2f s -> %s", streams,
                figures["final_latency_p95_s"] or 0, figures["cadence_p95_s"] or 0, "holds" if holds else "gives")
    return {"streams": streams, "holds": holds, "cpu_per_audio_s": cpu_per_audio, **figures}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="tiny.en, base, or any MODEL_ID (default tiny.en; random:near-free with --overhead)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--languages", help="comma-separated; default: en for English-only models, else all")
    parser.add_argument("--files", help="comma-separated audio names from the manifest (default all)")
    parser.add_argument("--limit", type=int, help="only the first N files (after --languages and --files)")
    parser.add_argument("--push-to-talk", action="store_true", help="only files of push-to-talk length (30 s or less)")
    parser.add_argument(
        "--stop-after", type=float, metavar="SECONDS",
        help="push-to-talk: send the stop this long after the file's last word (bench.data.speech_end), "
             "with silence past the file's end, instead of at its end",
    )
    parser.add_argument("--streams", type=int, default=1, help="concurrent clients in the main run")
    parser.add_argument(
        "--protocol", choices=("ws", "realtime"), default="ws",
        help="the main run and the sweep over the seed protocol (/ws) or OpenAI's Realtime API (/v1/realtime)",
    )
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time, 2 = twice as fast, 0 = no pacing")
    parser.add_argument("--sweep", action="store_true", help="also find streams per machine")
    parser.add_argument("--max-streams", type=int, default=16)
    parser.add_argument("--sweep-seconds", type=float, help="audio per client per sweep level (default 40; 30 with --overhead)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compute-type", default="int8_float32")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="the server's DEVICE")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline reference decode")
    parser.add_argument(
        "--auto-language", action="store_true", help="send no language: the server detects it (the offline decode is given it)"
    )
    parser.add_argument(
        "--soak", type=float, metavar="MINUTES", help="instead of one pass: back-to-back utterances on --streams for MINUTES"
    )
    parser.add_argument(
        "--admission", action="store_true",
        help="instead of one pass: --streams real-time streams at once (twice the server's capacity with --streams 1), "
             "with its own admission",
    )
    parser.add_argument(
        "--reconnect", action="store_true",
        help="with --soak: a new socket for each utterance, as push-to-talk clients do (refusals are counted)",
    )
    parser.add_argument(
        "--starts", type=int, metavar="N",
        help="instead of one pass: start the server N times and report each start-up's time and prior capacity",
    )
    parser.add_argument(
        "--upload-minutes", type=float, metavar="MINUTES",
        help="instead of one pass: --streams real-time streams alone, then beside uploads of MINUTES of speech (bench/upload.py)",
    )
    parser.add_argument("--live-seconds", type=float, default=180.0, help="audio per live client with --upload-minutes")
    parser.add_argument(
        "--overhead", action="store_true",
        help="instead of one pass: the server's own CPU per stream-second on a near-free model, streams swept (bench/overhead.py)",
    )
    parser.add_argument("--levels", help="with --overhead: comma-separated stream counts (default 8,16,32,64,128)")
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="with --overhead: that many servers behind HAProxy running deploy/haproxy.cfg, each with its share of "
             "--threads, measured whole (bench/replicas.py)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--env", action="append", default=[], help="extra server setting, NAME=VALUE")
    parser.add_argument(
        "--url", metavar="HOST:PORT",
        help="measure a server already running there (e.g. HAProxy before replicas, deploy/run-local.sh) instead of "
             "starting one: its settings are its own, and its CPU and memory are not measured",
    )
    args = parser.parse_args()
    args.model = args.model or (OVERHEAD_MODEL if args.overhead else "tiny.en")
    args.sweep_seconds = args.sweep_seconds or (30.0 if args.overhead else 40.0)
    if args.url and (args.soak or args.admission or args.env):
        parser.error("--url measures a server as it runs: no --soak, --admission or --env with it")
    if args.replicas < 1 or args.replicas > 1 and (not args.overhead or args.url):
        parser.error("--replicas: a count of 1 or more, with --overhead and without --url")
    return args


def select_items(args: argparse.Namespace, model_id: str) -> list[Item]:
    """The manifest's files that --languages, --files and --limit leave (English only for an .en model)."""
    config = Path(model_id, "config.json")
    english_only = args.model.endswith(".en") or config.exists() and '"lang_ids"' not in config.read_text()
    languages = set(args.languages.split(",")) if args.languages else ({"en"} if english_only else None)
    items = load_manifest(args.manifest, languages, set(args.files.split(",")) if args.files else None)
    items = push_to_talk(items) if args.push_to_talk else items
    items = items[: args.limit] if args.limit else items
    items = with_stop_after(items, args.stop_after) if args.stop_after is not None else items
    if not items:
        raise SystemExit("no files to stream: check --manifest, --languages and --files")
    return items


def against_offline(run: dict, rows: list[dict], reference: dict) -> None:
    """Add the offline decode's WER and compute to the run's figures, and its text to each file's."""
    run["offline_wer"] = reference["wer"]
    run["offline_cpu_s"] = reference["cpu_s"]
    run["wer_delta_points"] = (
        100 * (run["wer_final"] - reference["wer"]) if None not in (run["wer_final"], reference["wer"]) else None
    )
    run["compute_ratio"] = run["server_cpu_s"] / reference["cpu_s"] if reference["cpu_s"] and run["server_cpu_s"] else None
    for row in rows:
        row["offline"] = reference["texts"].get(row["file"])


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_id = resolve_model(args.model)
    if args.model.startswith("random:"):
        args.no_offline = True  # random weights: timing only, nothing to score
    items = select_items(args, model_id)
    args.out.mkdir(parents=True, exist_ok=True)
    # Sweeps and runs measure latency, not admission: every client is let in, unless --env says not.
    env = {"CPU_THREADS": str(args.threads), "COMPUTE_TYPE": args.compute_type, "DEVICE": args.device}
    if not args.admission:
        env.update(ADMISSION="fixed", MAX_SESSIONS="256", MAX_PARTIAL_LAG_SECONDS="0")
    env.update(pair.split("=", 1) for pair in args.env)
    protocol = "" if args.protocol == "ws" else f"{args.protocol}-"
    tag = f"{Path(args.model).name.replace(':', '-')}-{protocol}{time.strftime('%Y%m%d-%H%M%S')}"
    if args.soak:
        run_soak(args, model_id, items, env, tag)
        return
    if args.admission:
        run_admission(args, model_id, items, env, tag)
        return
    if args.overhead:
        run_overhead(args, model_id, items, env, tag)
        return
    if args.starts:
        run_starts(args, model_id, env, tag)
        return
    if args.upload_minutes:
        run_upload(args, model_id, items, plans_for(push_to_talk(items), args.streams, args.live_seconds), env, tag)
        return

    # The offline decode runs first, alone on the CPU: its word times are what word latency is
    # measured against, in the main run and the sweep alike.
    reference = None if args.no_offline else offline(model_id, items, args.threads, args.compute_type, args.device)
    spoken = reference["words"] if reference else {}
    with attach(args.url) if args.url else serve(model_id, env, args.out / f"{tag}-server.log") as server:
        partial_every = health(server)["partial_every_ms"] / 1000
        plans = [items[k :: args.streams] for k in range(args.streams)]
        model_before = model_seconds(server)
        utterances, cpu, wall = measure(server, plans, args.speed, f"{args.streams} stream(s)", args.auto_language,
                                        args.protocol)
        # Behind a balancer each reading comes from some replica: model time and calibration are
        # one replica's at best, so neither is reported for the whole.
        model_after = model_seconds(server) if not args.url else {}
        model_time = model_time_per_call(model_before, model_after) if not args.url else {}
        rows = [utterance_figures(u, spoken.get(u.item.name), args.speed) for u in utterances]
        audio = sum(r["duration_s"] for r in rows if "error" not in r)
        run = {**pooled(rows, {i.name: i for i in items}), "server_cpu_s": cpu, "audio_s": audio, "wall_s": wall,
               "cpu_per_audio_s": cpu / audio if audio and cpu is not None else None, "model_seconds_per_call": model_time,
               # finals decoded at the stop, and decodes started before it (the rest of the finals used one)
               "model_calls": model_calls(model_before, model_after) if not args.url else {}}
        if args.model.startswith("random:"):  # its text is noise: no accuracy figure is made of it
            run.update(wer_final=None, wer_last_partial=None)
        if reference:
            against_offline(run, rows, reference)

        def save(levels: list[dict], finished: bool) -> str:
            """Write the figures so far: after the main run and after each sweep level, so that a run
            stopped midway (a time limit, a crash) keeps what it measured. Returns the table."""
            server_health = health(server)
            if args.url:
                server_health.pop("calibration", None)
            if server_health.get("calibration"):
                run["predicted"] = predicted(server_health["calibration"], rows, args.streams)
            run["peak_rss_mb"] = server.peak_rss / 2**20 if server.process else None
            holding = [level["streams"] for level in levels if level["holds"]]
            result = {
                "environment": {**environment(args, model_id, server_health), "url": args.url},
                "calibration": server_health.get("calibration"),
                "capacity": server_health.get("capacity"),
                "run": run,
                "streams_per_machine": max(holding) if holding else (0 if levels else None),
                "sweep": levels,
                "sweep_finished": finished,
                "files": rows,
            }
            table = markdown(result)
            (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
            (args.out / f"{tag}.md").write_text(table)
            return table

        save([], finished=not args.sweep)
        levels = sweep(server, items, args, partial_every, spoken, lambda so_far: save(so_far, False)) if args.sweep else []
        table = save(levels, finished=True)
    if levels:
        if importlib.util.find_spec("matplotlib") is None:
            logger.warning("no plot of the sweep: matplotlib is not installed (pip install matplotlib)")
        else:
            plot(levels, args.out / f"{tag}.png", partial_every, args.model)
    print(table)


def run_soak(args: argparse.Namespace, model_id: str, items: list[Item], env: dict[str, str], tag: str) -> None:
    tag = f"soak-{tag}"
    with serve(model_id, env, args.out / f"{tag}-server.log") as server:
        result = soak(server, items, args.streams, args.soak, args.auto_language, args.reconnect)
        server_health = health(server)
    title = f"{args.model}, {args.streams} real-time streams, {args.soak:g} min"
    print(write_soak(result, args.out, tag, title, environment(args, model_id, server_health)))


def run_admission(args: argparse.Namespace, model_id: str, items: list[Item], env: dict[str, str], tag: str) -> None:
    """--streams clients at once (twice the capacity, with --streams 1): the admitted must hold the
    bounds, the rest get 1013."""
    tag = f"admission-{tag}"
    with serve(model_id, env, args.out / f"{tag}-server.log") as server:
        before = health(server)
        capacity, partial_every = before["max_sessions"], before["partial_every_ms"] / 1000
        streams = args.streams if args.streams > 1 else 2 * capacity
        plans = plans_for(push_to_talk(items), streams, args.sweep_seconds)
        utterances, _, _ = measure(server, plans, 1.0, f"{streams} streams, capacity {capacity}", args.auto_language)
        server_health = health(server)
    refused = [u for u in utterances if u.error and u.error.startswith(REFUSED)]
    admitted = [u for u in utterances if not (u.error and u.error.startswith(REFUSED))]
    figures = pooled([utterance_figures(u) for u in admitted], {i.name: i for i in items})
    holds = (figures["dropped"] == 0 and (figures["final_latency_p95_s"] or 0) <= 2.0
             and (figures["cadence_p95_s"] or 0) <= 2 * partial_every)
    result = {
        "environment": environment(args, model_id, server_health),
        "capacity": capacity,
        "streams": streams,
        "clients_refused": len(refused),
        "clients_admitted": streams - len(refused),
        "admitted_hold": holds,
        "admitted": figures,
        "calibration": before.get("calibration"),
        "capacity_after": server_health.get("capacity"),
    }
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
    table = "\n".join([
        f"### Admission: {args.model}, {streams} real-time streams at once against a calibrated capacity of {capacity}",
        "", "| figure | value |", "|---|---|",
        f"| clients admitted / refused with 1013 | {result['clients_admitted']} / {result['clients_refused']} |",
        f"| admitted: final p50 / p95 | {figures['final_latency_p50_s'] or 0:.2f} s / {figures['final_latency_p95_s'] or 0:.2f} s |",
        f"| admitted: cadence p50 / p95 | {figures['cadence_p50_s'] or 0:.2f} s / {figures['cadence_p95_s'] or 0:.2f} s |",
        f"| admitted: errors / dropped | {figures['errors']} / {figures['dropped']} |",
        f"| admitted hold the bounds | {'yes' if holds else 'no'} |",
    ]) + "\n"
    (args.out / f"{tag}.md").write_text(table)
    print(table)


def run_starts(args: argparse.Namespace, model_id: str, env: dict[str, str], tag: str) -> None:
    """Start the server --starts times: how long each takes to its first accepted connection (to
    /health's 200, polled every 0.2 s), and the prior capacity its timing gave."""
    import statistics

    tag = f"starts-{tag}"
    starts = []
    for index in range(args.starts):
        began = time.monotonic()
        with serve(model_id, {**env, "ADMISSION": "live"}, args.out / f"{tag}-server.log") as server:
            ready = time.monotonic() - began
            calibration = health(server)["calibration"]
        starts.append({"start_up_s": round(ready, 2), "capacity": calibration["capacity"],
                       "timing_s": calibration["seconds"], "workers": calibration["workers"],
                       "max_batch": calibration["max_batch"], "measured": calibration["measured"]})
        logger.info("start %d: %.1f s, about %d speakers", index + 1, ready, calibration["capacity"])
    capacities = [s["capacity"] for s in starts]
    median = statistics.median_low(capacities)
    result = {"environment": environment(args, model_id, {}), "starts": starts, "capacity_median": median,
              "start_up_s_max": max(s["start_up_s"] for s in starts)}
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    table = "\n".join([
        f"### Start-ups: {args.model}, {args.starts} fresh starts", "",
        "| start | start-up to first accepted connection | prior capacity | timing |", "|---|---|---|---|",
        *(f"| {i + 1} | {s['start_up_s']:.1f} s | {s['capacity']} | {s['timing_s']:.1f} s |" for i, s in enumerate(starts)),
        "", f"Prior capacity: median {median}, range {min(capacities)}-{max(capacities)}; "
            f"start-up at most {result['start_up_s_max']:.1f} s",
    ]) + "\n"
    (args.out / f"{tag}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
