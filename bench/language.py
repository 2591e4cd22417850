"""How much speech language detection needs: detection on growing stretches of each file's speech.

    python -m bench.language --model base

For every file of the manifest and each amount of speech (VAD seconds), the audio up to the moment
that much speech was heard goes through the engine's own partial decode with no language given, as
a live partial of an auto-language session does, once with the partials' trimmed encoder input and
once with Whisper's full 30 s. The table gives, per amount of speech, how often the detected
language is right, and how often it is right when its probability passes a threshold: the numbers
behind the session's rule for when a language is settled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.data import DEFAULT_MANIFEST, ROOT, load_manifest, read_pcm, resolve_model

SPEECH_SECONDS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


def prefixes(audio: np.ndarray, chunks: list[dict]) -> dict[float, int]:
    """For each amount of speech, the sample at which the stream had carried that much of it."""
    ends, heard = {}, 0
    for chunk in chunks:
        for amount in SPEECH_SECONDS:
            need = int(amount * 16000) - heard
            if amount not in ends and 0 < need <= chunk["end"] - chunk["start"]:
                ends[amount] = chunk["start"] + need
        heard += chunk["end"] - chunk["start"]
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.language", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    from faster_whisper.vad import get_speech_timestamps

    from realtime_stt.decoder import PARTIAL_ENCODER, DecodeOptions, Decoder, token_budget
    from realtime_stt.settings import Settings
    from realtime_stt.vad import VAD_OPTIONS

    decoder = Decoder(Settings(model_id=resolve_model(args.model), cpu_threads=args.threads, inference_workers=1))
    if not decoder.multilingual:
        raise SystemExit(f"{args.model} is English-only: nothing to detect")
    items = load_manifest(args.manifest, None, None)
    spans = {"partial": PARTIAL_ENCODER, "30 s": None}
    rows = []
    for item in items:
        audio = np.frombuffer(read_pcm(item.path), dtype="<i2").astype(np.float32) / 32768
        for amount, end in prefixes(audio, get_speech_timestamps(audio, VAD_OPTIONS)).items():
            for span_name, span in spans.items():
                options = DecodeOptions(language=None, encoder=span, max_new_tokens=token_budget(end / 16000))
                [found] = decoder.decode_batch([audio[:end]], [options])
                rows.append({"file": item.name, "language": item.language, "speech_s": amount, "span": span_name,
                             "detected": found.language, "probability": found.language_probability})
        print(item.name, flush=True)

    lines = [f"### Language detection by amount of speech ({args.model}, {len(items)} files)", "",
             "| speech | encoder | files | right | " + " | ".join(f"p >= {t}: share / right" for t in THRESHOLDS) + " |",
             "|---|---|---|---|" + "---|" * len(THRESHOLDS)]
    for amount in SPEECH_SECONDS:
        for span_name in spans:
            group = [r for r in rows if r["speech_s"] == amount and r["span"] == span_name]
            if not group:
                continue
            cells = []
            for threshold in THRESHOLDS:
                sure = [r for r in group if r["probability"] >= threshold]
                right = sum(r["detected"] == r["language"] for r in sure)
                cells.append(f"{len(sure) / len(group):.0%} / {right / len(sure):.0%}" if sure else "0 % / -")
            right = sum(r["detected"] == r["language"] for r in group) / len(group)
            lines.append(f"| {amount:g} s | {span_name} | {len(group)} | {right:.0%} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"language-{Path(args.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"{tag}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
