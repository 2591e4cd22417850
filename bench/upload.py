"""Uploads beside live speakers: N real-time streams alone, then the same N streams while a file of M
minutes of speech (the manifest's scored files back to back) is posted to the OpenAI-compatible
``/v1/audio/transcriptions`` with the official ``openai`` client, again and again for the whole run.

    python -m bench --model tiny.en --upload-minutes 10 --streams 4

Reports partial cadence and final latency (p50 and p95) of both runs and their change, and the
upload's real-time factor (wall seconds per audio second) and WER against the files' references.
The first upload is always waited for; one still running when the live streams end is cancelled
(its client leaves, so the server drops its remaining windows unrun).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import time
import wave

from bench.data import Item, read_pcm
from bench.metrics import error_rate
from bench.report import environment, pooled, utterance_figures
from bench.server import Server, health, model_seconds, model_time_per_call, serve
from bench.stream import Utterance, measure, run_streams

logger = logging.getLogger("bench")

BOUND = 0.10  # the goal: cadence p95 and final p95 with the upload within 10 % of the streams alone


def upload_file(items: list[Item], minutes: float) -> tuple[bytes, str, float]:
    """A WAV of the scored files back to back (round again until ``minutes``), its reference text
    and its seconds."""
    scored = [item for item in items if item.scored] or items
    pcm, references, seconds, k = [], [], 0.0, 0
    while seconds < minutes * 60:
        item = scored[k % len(scored)]
        pcm.append(read_pcm(item.path))
        references.append(item.reference)
        seconds += len(pcm[-1]) / 32000
        k += 1
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(b"".join(pcm))
    return out.getvalue(), " ".join(references), seconds


async def _uploads(url: str, data: bytes, live_ended: asyncio.Event, done: list[dict]) -> None:
    """Post the file again and again until the live streams end (the first one always finishes)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://{url}/v1", api_key="bench", max_retries=0, timeout=7200)
    async with client:
        while not (done and live_ended.is_set()):
            began = time.monotonic()
            result = await client.audio.transcriptions.create(model="whisper-1", file=("upload.wav", data))
            done.append({"wall_s": time.monotonic() - began, "text": result.text,
                         "during_live_streams": not live_ended.is_set()})


async def _with_uploads(url: str, plans: list[list[Item]], data: bytes, label: str) -> tuple[list[Utterance], list[dict]]:
    live_ended, done = asyncio.Event(), []
    uploader = asyncio.create_task(_uploads(url, data, live_ended, done))
    utterances = await run_streams(url, plans, 1.0, label)
    live_ended.set()
    if done:
        uploader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await uploader
    return utterances, done


def _figures(utterances: list[Utterance], items: list[Item], cpu: float) -> dict:
    rows = [utterance_figures(u) for u in utterances]
    audio = sum(r["duration_s"] for r in rows if "error" not in r)
    return {**pooled(rows, {i.name: i for i in items}), "server_cpu_s": cpu, "audio_s": audio}


def _change(alone: float | None, loaded: float | None) -> float | None:
    return loaded / alone - 1 if alone and loaded is not None else None


def upload_beside_streams(server: Server, items: list[Item], plans: list[list[Item]], args: argparse.Namespace) -> dict:
    """The same live plans alone, then beside the upload."""
    data, reference, seconds = upload_file(items, args.upload_minutes)
    alone_utterances, alone_cpu, _ = measure(server, plans, 1.0, f"{args.streams} streams alone")
    before, cpu_before = model_seconds(server), server.cpu_seconds()
    loaded_utterances, uploads = asyncio.run(_with_uploads(server.url, plans, data, f"{args.streams} streams + upload"))
    model_time = model_time_per_call(before, model_seconds(server))
    alone = _figures(alone_utterances, items, alone_cpu)
    loaded = _figures(loaded_utterances, items, server.cpu_seconds() - cpu_before)
    first = uploads[0]
    changes = {key: _change(alone[key], loaded[key]) for key in
               ("cadence_p50_s", "cadence_p95_s", "final_latency_p50_s", "final_latency_p95_s")}
    return {
        "streams": args.streams,
        "live_seconds": args.live_seconds,
        "alone": alone,
        "with_upload": loaded,
        "change": changes,
        "within_bound": all(changes[k] is not None and changes[k] <= BOUND for k in ("cadence_p95_s", "final_latency_p95_s")),
        "upload": {
            "audio_s": seconds,
            "bytes": len(data),
            "wall_s": first["wall_s"],
            "real_time_factor": first["wall_s"] / seconds,
            "during_live_streams": first["during_live_streams"],
            "wer": error_rate([(reference, first["text"], "en")]),
            "completed": len(uploads),
            "completed_during_live_streams": sum(u["during_live_streams"] for u in uploads),
            "model_seconds_per_step": model_time.get("upload"),
        },
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.0f} %"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def markdown(result: dict, model: str) -> str:
    alone, loaded, change, upload = result["alone"], result["with_upload"], result["change"], result["upload"]

    def row(label: str, key: str) -> str:
        return f"| {label} | {_s(alone[key])} | {_s(loaded[key])} | {_pct(change[key])} |"

    counts = [f"{run['files']} / {run['errors']} / {run['dropped']}" for run in (alone, loaded)]
    finished = "" if upload["during_live_streams"] else " (it finished after the live streams had ended)"
    lines = [
        (f"### Upload beside live speakers: {model}, {result['streams']} real-time stream(s) "
         f"(about {result['live_seconds']:g} s each), a {upload['audio_s'] / 60:.1f}-minute upload"),
        "",
        "| figure | streams alone | with the upload | change |",
        "|---|---|---|---|",
        row("partial cadence p50", "cadence_p50_s"),
        row("partial cadence p95", "cadence_p95_s"),
        row("final latency p50", "final_latency_p50_s"),
        row("final latency p95", "final_latency_p95_s"),
        f"| utterances / errors / dropped | {counts[0]} | {counts[1]} | |",
        f"| server CPU s | {alone['server_cpu_s']:.1f} | {loaded['server_cpu_s']:.1f} | |",
        "",
        (f"Upload: {upload['audio_s']:.0f} s of speech ({upload['bytes'] / 2**20:.1f} MiB WAV) in {upload['wall_s']:.1f} s, "
         f"a real-time factor of **{upload['real_time_factor']:.3f}**{finished}; WER {100 * upload['wer']:.1f} %; "
         f"{upload['completed']} upload(s) completed, {upload['completed_during_live_streams']} while the streams ran."),
        (f"Cadence p95 and final p95 within {100 * BOUND:.0f} % of the streams alone: "
         f"**{'yes' if result['within_bound'] else 'no'}**."),
    ]
    return "\n".join(lines) + "\n"


def run_upload(
    args: argparse.Namespace, model_id: str, items: list[Item], plans: list[list[Item]], env: dict[str, str], tag: str
) -> None:
    tag, out = f"upload-{tag}", args.out
    with serve(model_id, env, out / f"{tag}-server.log") as server:
        result = upload_beside_streams(server, items, plans, args)
        result["environment"] = environment(args, model_id, health(server))
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
    table = markdown(result, args.model)
    (out / f"{tag}.md").write_text(table)
    print(table)
