"""The OpenAI-compatible endpoint's accuracy, file by file, against the offline decode.

    python -m bench.rest --model tiny.en

Each file of the manifest (English only for an English-only model) is posted alone to
``/v1/audio/transcriptions`` with the official ``openai`` client, and decoded offline by plain
faster-whisper (the benchmark's reference decode). Reported: the pooled WER of both, the files whose
texts are the same once normalised, and the real-time factor of the uploads, in a JSON and a
markdown table in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bench.data import DEFAULT_MANIFEST, ROOT, load_manifest, resolve_model
from bench.metrics import error_rate, units
from bench.report import offline
from bench.server import serve


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_id = resolve_model(args.model)
    items = load_manifest(DEFAULT_MANIFEST, {"en"} if args.model.endswith(".en") else None, None)
    reference = offline(model_id, items, args.threads, "int8_float32", "cpu")
    texts, wall = {}, 0.0
    env = {"CPU_THREADS": str(args.threads), "MAX_UPLOAD_SECONDS": "7200"}
    tag = f"rest-{Path(args.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with serve(model_id, env, args.out / f"{tag}-server.log") as server:
        client = openai.OpenAI(base_url=f"http://{server.url}/v1", api_key="bench", max_retries=0, timeout=3600)
        for item in items:
            start = time.monotonic()
            with item.path.open("rb") as audio:
                answer = client.audio.transcriptions.create(model="whisper-1", file=audio, language=item.language)
            wall += time.monotonic() - start
            texts[item.name] = answer.text
    scored = [i for i in items if i.scored]
    same = [i.name for i in items if units(texts[i.name], i.language) == units(reference["texts"][i.name], i.language)]
    result = {
        "model": args.model,
        "files": len(items),
        "wer_rest": error_rate([(i.reference, texts[i.name], i.language) for i in scored]),
        "wer_offline": reference["wer"],
        "same_text_files": len(same),
        "real_time_factor": wall / sum(i.duration for i in items),
        "texts": {i.name: {"rest": texts[i.name], "offline": reference["texts"][i.name]} for i in items},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    table = "\n".join([
        f"### OpenAI-compatible endpoint against the offline decode: {args.model}, {len(items)} files, one at a time",
        "", "| figure | value |", "|---|---|",
        f"| WER, REST / offline | {100 * result['wer_rest']:.1f} % / {100 * result['wer_offline']:.1f} % |",
        f"| files with the same text (normalised) | {len(same)} of {len(items)} |",
        f"| real-time factor of the uploads (wall s per audio s) | {result['real_time_factor']:.3f} |",
    ]) + "\n"
    (args.out / f"{tag}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
