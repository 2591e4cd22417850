"""The benchmark cannot rot: its figures on plain lists, and one short real run end to end."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from conftest import EVAL_DIR, ROOT, manifest, read_pcm, tiny_model_path

from bench.metrics import committed_revisions, coverage, error_rate, flicker, percentile, units, word_latency


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_an_ellipsis_that_words_then_follow_is_no_rewrite():
    # The English normaliser keeps a trailing '...' as a '.' of its own: it is no word shown.
    assert flicker(["we are expecting...", "we are expecting... some people"]) == (0, 0, 1)
    assert units("pictures are... a sort of", "en") == ["pictures", "are", "a", "sort", "of"]
    assert units("3.5 seconds", "en") == ["3.5", "seconds"]


def test_flicker_counts_rewrites_of_shown_words_but_not_a_growing_last_word():
    partials = [
        "if the",
        "if the reader",  # grows: no rewrite
        "if the readers will",  # last shown word changed: strict only
        "if a reader will excuse",  # 'the' was shown and changed: a rewrite
        "if a reader will excuse",  # no change: not an update
    ]
    assert flicker(partials) == (1, 2, 3)


def test_coverage_and_committed_revisions():
    assert coverage("The narrative would be tedious.", "the narrative would") == (3, 5)
    assert coverage("Ask not.", "") == (0, 2)
    assert committed_revisions(["", "If", "If the", "If the reader"]) == 0
    assert committed_revisions(["If the", "If a"]) == 1


def test_word_latency_is_the_first_partial_that_holds_a_word_after_it_was_spoken():
    words = [(" Ask", 0.2, 0.5), (" not", 0.5, 0.8), (" what", 0.9, 1.1), (" your", 1.1, 1.3)]
    partials = [
        (0.3, "", "what"),  # 'what' not yet begun: a coincidence, not the word
        (0.9, "", "Ask not"),
        (1.4, "Ask", "Ask not, what"),  # shown in order; 'your' never shown
    ]
    shown, committed = word_latency(words, partials)
    assert shown[:3] == pytest.approx([0.4, 0.1, 0.3]) and shown[3] is None
    assert committed[0] == pytest.approx(0.9) and committed[1:] == [None, None, None]


def test_the_first_word_begins_where_speech_does_not_at_the_padded_vad_chunk():
    from bench.data import load_manifest
    from bench.report import offline, speech_onset

    [item] = load_manifest(EVAL_DIR / "manifest.jsonl", None, {"en_mfa_style_whispered.wav"})
    audio = np.frombuffer(read_pcm(item.name), dtype="<i2").astype(np.float32) / 32768
    onset = speech_onset(audio)
    assert 0.6 < onset < 1.0  # most of a second of silence first
    first_word = offline(tiny_model_path(), [item], 2, "int8_float32")["words"][item.name][0]
    # Whisper alone put this word's start 0.4 s before the speech, at 0.53 s.
    assert first_word[1] >= min(onset, first_word[2]) - 1e-6


def test_push_to_talk_stops_a_set_time_after_the_last_word():
    from bench.data import load_manifest, with_stop_after

    names = {"en_libritts_test-clean_260_horizon.wav", "en_jfk_inaugural_1961.wav"}
    items = {i.name: i for i in with_stop_after(load_manifest(EVAL_DIR / "manifest.jsonl", None, names), 0.2)}
    horizon, jfk = items["en_libritts_test-clean_260_horizon.wav"], items["en_jfk_inaugural_1961.wav"]
    # 'horizon' ends at 2.4-2.7 s (level and Silero) and 2.3 s of silence follow: the stop comes 0.2 s
    # after the word, not at the file's 5.0 s.
    assert 2.6 <= horizon.stop_s <= 2.95 and horizon.sent_seconds == horizon.stop_s
    # '... for your country' runs to the file's last sample: silence is sent past it.
    assert jfk.stop_s == pytest.approx(jfk.duration + 0.2, abs=0.05)


def test_error_rate_pools_words_and_scores_characters_for_chinese():
    assert error_rate([("Hello world.", "hello world", "en"), ("One two three four", "one two", "en")]) == pytest.approx(2 / 6)
    assert error_rate([("今天天气", "今天天气", "zh")]) == 0.0


def run_bench(out, report: str, timeout: int, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``python -m bench --model tiny.en ARGS`` into ``out``; its output and its one JSON report.
    The server it starts measures the two-worker layout alone (as tests/conftest.py's servers do)."""
    layout = [] if "--url" in args else ["--env", "INFERENCE_WORKERS=2"]
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--model", "tiny.en", *layout, *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = out.glob(report)
    return result, json.loads(path.read_text())


def start_bench(out, *args: str) -> tuple[subprocess.Popen, list[psutil.Process], dict]:
    """``python -m bench --model tiny.en ARGS --sweep`` into ``out``, left running once the main run
    is on disk (the sweep of 900 s a client after it is still under way); the processes it started
    (its server) and the main run's figures."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--model", "tiny.en", "--env", "INFERENCE_WORKERS=2", "--files", "en_cmu_goforward.wav",
         *args, "--sweep", "--max-streams", "2", "--sweep-seconds", "900", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # As a terminal's process has it: a run launched as a background job inherits SIGINT ignored,
        # and the Ctrl-C below must not depend on how the suite was started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 600  # the offline decode, the server's start, the main run
        while not list(out.glob("*.md")) and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # the table is written after the JSON: the JSON is whole by then
        assert bench.poll() is None, bench.stderr.read()[-3000:]
        [path] = out.glob("*.json")
        return bench, psutil.Process(bench.pid).children(recursive=True), json.loads(path.read_text())
    except BaseException:
        bench.kill()
        raise


def stopped(bench: subprocess.Popen, started: list[psutil.Process], sig: signal.Signals) -> int:
    """Send ``sig`` to the benchmark; its exit status, once every process it started has ended too."""
    ports = [int(p.cmdline()[p.cmdline().index("--port") + 1]) for p in started if "--port" in p.cmdline()]
    assert ports, [p.cmdline() for p in started]  # its uvicorn
    bench.send_signal(sig)
    try:
        status = bench.wait(timeout=60)
    except subprocess.TimeoutExpired:
        bench.kill()
        raise AssertionError(f"the benchmark did not stop within 60 s of {sig.name}")
    gone, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left running after {sig.name}: {[p.cmdline() for p in alive]}"
    for port in ports:  # and nothing listens where its server did
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    return status


def test_a_short_real_run_produces_every_figure_and_ctrl_c_keeps_them_and_stops_its_server(tmp_path):
    # A fifth of real time: the 2.8 s file gets partials with text, so the partial figures are
    # exercised, even on a machine that decodes slower than real time. Ctrl-C (SIGINT) then stops a
    # long run midway (a machine lent for minutes): what it measured stays on disk, and its server stops.
    bench, started, figures = start_bench(tmp_path, "--speed", "0.2")
    assert stopped(bench, started, signal.SIGINT) != 0
    run = figures["run"]
    assert run["files"] == 1 and run["dropped"] == 0 and run["errors"] == 0
    assert 0 <= run["wer_final"] <= 0.2 and run["offline_wer"] is not None
    assert run["final_latency_p50_s"] > 0 and run["cpu_per_audio_s"] > 0 and run["peak_rss_mb"] > 50
    assert run["committed_revisions"] == 0
    assert figures["environment"]["model"] == "tiny.en"
    assert run["cadence_p50_s"] > 0 and run["first_text_p50_s"] > 0 and run["flicker"] is not None
    assert 0 <= run["coverage"] <= 1 and isinstance(run["wer_last_partial"], float)
    # Word latency against the offline decode's word times. Slower than real time, a partial can
    # hold a word before the last of it has arrived (in wall seconds): a latency below zero.
    assert 0 < run["words_shown_before_stop"] <= 1 and isinstance(run["word_shown_p50_s"], float)
    assert run["first_words_p50_s"] > 0
    [row] = figures["files"]
    assert row["final"] and row["last_partial"] and row["partials"] >= 2 and row["wer_final"] == run["wer_final"]
    assert figures["sweep"] == [] and figures["sweep_finished"] is False
    [table] = tmp_path.glob("*.md")
    assert "| final latency p50 / p95 |" in table.read_text() and "| word shown p50 / p95 (committed) |" in table.read_text()


def test_sigterm_stops_the_benchmark_and_its_server_and_keeps_what_it_measured(tmp_path):
    # A service manager's stop, or a CI job's time limit: SIGTERM, not Ctrl-C.
    bench, started, figures = start_bench(tmp_path, "--no-offline", "--speed", "0")
    assert stopped(bench, started, signal.SIGTERM) == 128 + signal.SIGTERM
    assert figures["run"]["files"] == 1 and figures["run"]["final_latency_p50_s"] is not None
    assert figures["sweep"] == [] and figures["sweep_finished"] is False
    [table] = tmp_path.glob("*.md")
    assert "| final latency p50 / p95 |" in table.read_text()


def test_a_half_minute_soak_samples_the_server_and_judges_it(tmp_path):
    # Short files, so that the last utterance begun within the half minute ends soon after it.
    short = "en_cmu_goforward.wav,en_ljspeech_LJ002-0020.wav,en_ljspeech_LJ002-0035.wav,en_speechrecognition_one_two_three.wav"
    result, figures = run_bench(tmp_path, "soak-*.json", 600, "--files", short, "--streams", "2", "--soak", "0.5")
    samples = figures["samples"]  # one every 10 s
    assert len(samples) >= 3 and samples[-1]["t_s"] >= 30
    assert all(s["rss_mb"] > 50 and s["fds"] > 0 and s["threads"] > 0 and s["asyncio_tasks"] > 0 for s in samples)
    verdict = figures["verdict"]
    assert verdict["utterances"] >= 3 and verdict["errors"] == 0
    for key in ("rss_growth", "fds_growth", "threads_growth", "tasks_growth", "final_p95_last_s", "cadence_p95_last_s", "holds"):
        assert key in verdict, key
    assert figures["per_minute"][0]["utterances"] >= 2
    assert "| holds" in result.stdout


def test_a_random_weight_model_of_a_whisper_shape_times_like_one_and_says_so(tmp_path, monkeypatch):
    """bench.shapes builds a model of tiny's shape with random weights that faster-whisper loads;
    its decodes end after a sentence's worth of tokens (not Whisper's 448), without fallback."""
    from faster_whisper import WhisperModel

    from bench.shapes import SPEECH_TOKENS, resolve

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = resolve("random:tiny")
    assert "random-weights" in path and "random weights" in (tmp_path / "stt-bench" / "random-weights-tiny" / "RANDOM_WEIGHTS.txt").read_text()
    model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=2)
    import numpy as np

    audio = np.frombuffer(read_pcm("en_cmu_goforward.wav"), "<i2").astype(np.float32) / 32768
    segments, _ = model.transcribe(audio, language="en", beam_size=1, without_timestamps=True, vad_filter=False,
                                   temperature=0.0, condition_on_previous_text=False)
    [segment] = list(segments)
    # The prompt's last position picks a token too, then SPEECH_TOKENS positions, then the end.
    assert len(segment.tokens) == SPEECH_TOKENS + 1 and segment.temperature == 0.0


def test_a_short_upload_beside_a_live_stream(tmp_path):
    result, figures = run_bench(tmp_path, "upload-*.json", 600, "--files", "en_cmu_goforward.wav", "--streams", "1",
                                "--upload-minutes", "0.1", "--live-seconds", "2")
    alone, loaded, upload = figures["alone"], figures["with_upload"], figures["upload"]
    assert alone["files"] == loaded["files"] == 1 and alone["dropped"] == loaded["dropped"] == 0
    assert alone["final_latency_p95_s"] > 0 and loaded["final_latency_p95_s"] > 0
    assert upload["completed"] >= 1 and upload["audio_s"] >= 6 and 0 < upload["real_time_factor"] < 1
    assert upload["wer"] <= 0.5 and "cadence_p95_s" in figures["change"]  # the 2.8 s file three times
    assert "| partial cadence p95 |" in result.stdout and "real-time factor" in result.stdout


def test_the_realtime_arm_measures_the_same_figures_through_openais_realtime_api(tmp_path):
    # --protocol realtime streams through /v1/realtime: deltas count as partials, completed as the final.
    result, figures = run_bench(tmp_path, "*-realtime-*.json", 600, "--files", "en_cmu_goforward.wav", "--no-offline",
                                "--protocol", "realtime")
    run, [row] = figures["run"], figures["files"]
    assert figures["environment"]["protocol"] == "realtime" and "over OpenAI's Realtime API" in result.stdout
    assert run["dropped"] == run["errors"] == 0 and run["wer_final"] <= 0.25 and run["final_latency_p50_s"] > 0
    assert row["committed_revisions"] == 0 and row["final"]


def test_the_overhead_sweep_prints_the_servers_own_cost_as_json(tmp_path):
    """bench --overhead on its near-free model: two real-time streams of a few seconds each, and the
    last line on stdout is one JSON object with the streams held and the CPU per stream-second."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--overhead", "--levels", "2", "--sweep-seconds", "3",
         "--files", "en_cmu_goforward.wav", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["streams_held"] in (0, 2) and figures["measured_at_streams"] == 2
    assert figures["server_cpu_ms_per_stream_second"] > 0 and figures["server_cpu_all_ms_per_stream_second"] > 0
    [level] = figures["levels"]
    assert level["stream_seconds"] >= 5 and level["dropped"] == 0 and level["model_cpu_s"] > 0
    assert 0 < level["client_cores_busy"] < 1
    [path] = tmp_path.glob("overhead-*.json")
    assert json.loads(path.read_text())["environment"]["model"] == "random:near-free"
    assert "| streams | holds |" in result.stdout
