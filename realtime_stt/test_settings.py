"""Settings from the environment."""

from __future__ import annotations

import pytest

from realtime_stt.settings import Settings, SettingsError


def test_settings_come_from_the_environment_with_the_seed_defaults():
    assert Settings.from_env({}) == Settings()
    default = Settings()
    assert (default.model_id, default.device, default.compute_type) == ("large-v3-turbo", "auto", "int8_float32")
    assert (default.partial_every_ms, default.window_seconds) == (500, 6.0)
    custom = Settings.from_env({"PARTIAL_EVERY_MS": "250", "ALLOWED_ORIGINS": "https://app.example/, localhost"})
    assert custom.partial_every_ms == 250
    assert custom.allowed_origins == ("https://app.example", "localhost")
    assert Settings.from_env({"TRIM_ENCODER_INPUT": "false"}).trim_encoder_input is False
    assert Settings.from_env({"FINAL_MODE": "tail"}).final_mode == "tail"
    assert (default.fast_partial_every_ms, default.first_partial_every_ms) == (250, 125)
    assert Settings.from_env({"FIRST_PARTIAL_EVERY_MS": "0"}).first_partial_every_ms == 0
    for name, value in [("TRIM_ENCODER_INPUT", "maybe"), ("FINAL_MODE", "best"), ("DEVICE", "tpu"), ("PARTIAL_EVERY_MS", "fast"), ("WINDOW_SECONDS", "90"), ("MAX_SESSIONS", "0"), ("FIRST_PARTIAL_EVERY_MS", "-1")]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


def test_inference_workers_setting():
    assert Settings.from_env({}).inference_workers is None  # chosen from the device and threads
    assert Settings.from_env({"INFERENCE_WORKERS": "3"}).inference_workers == 3
    with pytest.raises(SettingsError, match="INFERENCE_WORKERS"):
        Settings.from_env({"INFERENCE_WORKERS": "0"})


def test_the_lag_bound_of_admission():
    assert Settings.from_env({}).max_partial_lag_seconds is None  # twice the working cadence
    assert Settings.from_env({"MAX_PARTIAL_LAG_SECONDS": "0"}).max_partial_lag_seconds == 0  # off
    assert Settings.from_env({"MAX_PARTIAL_LAG_SECONDS": "2.5"}).max_partial_lag_seconds == 2.5
    with pytest.raises(SettingsError, match="MAX_PARTIAL_LAG_SECONDS"):
        Settings.from_env({"MAX_PARTIAL_LAG_SECONDS": "-1"})


def test_upload_settings():
    default = Settings.from_env({})
    assert (default.max_upload_mb, default.max_upload_seconds, default.max_uploads) == (25.0, 3600.0, 4)
    custom = Settings.from_env({"MAX_UPLOAD_MB": "0.5", "MAX_UPLOAD_SECONDS": "60", "MAX_UPLOADS": "1"})
    assert (custom.max_upload_mb, custom.max_upload_seconds, custom.max_uploads) == (0.5, 60.0, 1)
    for name, value in [("MAX_UPLOAD_MB", "0"), ("MAX_UPLOAD_SECONDS", "lots"), ("MAX_UPLOADS", "0")]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})
    assert Settings(api_key="k").key_given("Bearer k") and not Settings(api_key="k").key_given("Bearer x")
    assert Settings(api_key="k").key_given(None, "k") and Settings().key_given(None)


def test_wyoming_settings():
    default = Settings.from_env({})
    assert (default.wyoming_port, default.wyoming_host) == (None, "127.0.0.1")  # off
    custom = Settings.from_env({"WYOMING_PORT": "10300", "WYOMING_HOST": "0.0.0.0"})
    assert (custom.wyoming_port, custom.wyoming_host) == (10300, "0.0.0.0")
    for value in ("0", "70000", "ten"):
        with pytest.raises(SettingsError, match="WYOMING_PORT"):
            Settings.from_env({"WYOMING_PORT": value})


def test_readmes_settings_table_names_every_setting_with_its_default():
    """README's Settings table is the user's contract: every variable from_env reads, no other, each
    with the default Settings has (a computed or calibrated one in words, not as a fixed value)."""
    import inspect
    import os
    import re
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", table, re.M))
    read = set(re.findall(r'"([A-Z][A-Z_]+)"', inspect.getsource(Settings.from_env)))
    assert set(rows) == read, (sorted(set(rows) - read), sorted(read - set(rows)))
    defaults = {f.name: getattr(Settings(), f.name) for f in fields(Settings)}
    for name, cell in rows.items():
        default, given = defaults[name.lower()], re.match(r"`([^`]*)`", cell.strip())
        if default is None or (name == "CPU_THREADS" and default == os.cpu_count()):
            assert given is None, (name, cell)  # no fixed value to claim
        elif isinstance(default, bool):
            assert given and given[1] == str(default).lower(), (name, cell)
        elif isinstance(default, (int, float)):
            assert given and float(given[1]) == default, (name, cell, default)
        elif isinstance(default, tuple):
            assert given and given[1] == ",".join(default), (name, cell, default)
        else:
            assert given and given[1] == default, (name, cell, default)
