"""Settings: everything a user can change, read once from environment variables of the same name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

SAMPLE_RATE = 16_000  # the protocol's PCM and Whisper's input
DEFAULT_ALLOWED_ORIGINS = ("localhost", "127.0.0.1", "[::1]")


CALIBRATED = ("PARTIAL_EVERY_MS", "INFERENCE_WORKERS", "MAX_SESSIONS", "MAX_BATCH")  # defaults calibration may move


class SettingsError(ValueError):
    """A setting from the environment has a value the server cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything a user can change, read once from environment variables of the same name."""

    model_id: str = "large-v3-turbo"
    device: str = "auto"
    compute_type: str = "int8_float32"
    partial_every_ms: int = 500
    # While the model has time, partials come this often instead (on the same grid; 0: never).
    fast_partial_every_ms: int = 250
    # Until an utterance shows its first words, partials come this often while the model has time for it.
    first_partial_every_ms: int = 125
    window_seconds: float = 6.0
    cpu_threads: int = os.cpu_count() or 1
    inference_workers: int | None = None  # None: chosen by calibration
    max_sessions: int = 16  # with ADMISSION=live a ceiling only where set; with fixed, the limit
    # live: speakers are admitted by the capacity the live work shows (MAX_SESSIONS, where set, caps
    # it); fixed: by MAX_SESSIONS alone (and late partials), as for a benchmark's sweep.
    admission: str = "live"
    max_utterance_seconds: float = 600.0
    final_mode: str = "full"
    trim_encoder_input: bool = True
    max_batch: int = 8
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
    idle_timeout_seconds: float = 300.0  # 0: never
    drain_seconds: float = 10.0
    send_timeout_seconds: float = 20.0
    # New sockets are refused while partials run this late (None: twice the cadence; 0: never).
    max_partial_lag_seconds: float | None = None
    # Uploads (the OpenAI-compatible API): OpenAI's own size limit; a cap on the decoded audio, as a
    # small compressed file can hold hours; and how many may be in the server at once (the rest: 429).
    max_upload_mb: float = 25.0
    max_upload_seconds: float = 3600.0
    max_uploads: int = 4
    # Home Assistant's Wyoming protocol on TCP (None: off); it has no API key, so it listens on
    # loopback unless WYOMING_HOST says otherwise.
    wyoming_port: int | None = None
    wyoming_host: str = "127.0.0.1"
    # The variables the environment set: those win over what calibration would choose.
    explicit: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        defaults = cls()
        origins = env.get("ALLOWED_ORIGINS", "").strip()
        return cls(
            model_id=env.get("MODEL_ID", "").strip() or defaults.model_id,
            device=_choice(env, "DEVICE", defaults.device, ("auto", "cpu", "cuda")),
            compute_type=env.get("COMPUTE_TYPE", "").strip() or defaults.compute_type,
            partial_every_ms=int(_number(env, "PARTIAL_EVERY_MS", defaults.partial_every_ms, 50, 10_000, int)),
            fast_partial_every_ms=int(
                _number(env, "FAST_PARTIAL_EVERY_MS", defaults.fast_partial_every_ms, 0, 10_000, int)
            ),
            first_partial_every_ms=int(
                _number(env, "FIRST_PARTIAL_EVERY_MS", defaults.first_partial_every_ms, 0, 10_000, int)
            ),
            window_seconds=_number(env, "WINDOW_SECONDS", defaults.window_seconds, 1.0, 30.0, float),
            cpu_threads=int(_number(env, "CPU_THREADS", defaults.cpu_threads, 1, 256, int)),
            inference_workers=(
                int(_number(env, "INFERENCE_WORKERS", 1, 1, 64, int)) if env.get("INFERENCE_WORKERS", "").strip() else None
            ),
            max_sessions=int(_number(env, "MAX_SESSIONS", defaults.max_sessions, 1, 10_000, int)),
            admission=_choice(env, "ADMISSION", defaults.admission, ("live", "fixed")),
            max_utterance_seconds=_number(
                env, "MAX_UTTERANCE_SECONDS", defaults.max_utterance_seconds, 1.0, 7200.0, float
            ),
            final_mode=_choice(env, "FINAL_MODE", defaults.final_mode, ("auto", "tail", "full")),
            trim_encoder_input=_choice(env, "TRIM_ENCODER_INPUT", "true", ("true", "false", "1", "0"))
            in ("true", "1"),
            max_batch=int(_number(env, "MAX_BATCH", defaults.max_batch, 1, 64, int)),
            api_key=env.get("API_KEY") or None,
            allowed_origins=(
                tuple(o.strip().rstrip("/").lower() for o in origins.split(",") if o.strip())
                if origins
                else defaults.allowed_origins
            ),
            idle_timeout_seconds=_number(env, "IDLE_TIMEOUT_SECONDS", defaults.idle_timeout_seconds, 0.0, 86_400.0, float),
            drain_seconds=_number(env, "DRAIN_SECONDS", defaults.drain_seconds, 0.0, 3600.0, float),
            send_timeout_seconds=_number(env, "SEND_TIMEOUT_SECONDS", defaults.send_timeout_seconds, 1.0, 3600.0, float),
            max_partial_lag_seconds=(
                _number(env, "MAX_PARTIAL_LAG_SECONDS", 0.0, 0.0, 3600.0, float)
                if env.get("MAX_PARTIAL_LAG_SECONDS", "").strip() else None
            ),
            max_upload_mb=_number(env, "MAX_UPLOAD_MB", defaults.max_upload_mb, 0.001, 100_000.0, float),
            max_upload_seconds=_number(env, "MAX_UPLOAD_SECONDS", defaults.max_upload_seconds, 1.0, 86_400.0, float),
            max_uploads=int(_number(env, "MAX_UPLOADS", defaults.max_uploads, 1, 10_000, int)),
            wyoming_port=(
                int(_number(env, "WYOMING_PORT", 0, 1, 65_535, int)) if env.get("WYOMING_PORT", "").strip() else None
            ),
            wyoming_host=env.get("WYOMING_HOST", "").strip() or defaults.wyoming_host,
            explicit=frozenset(name for name in CALIBRATED if env.get(name, "").strip()),
        )

    def key_given(self, authorization: str | None, token: str | None = None) -> bool:
        """Whether a request carries API_KEY, as ``Authorization: Bearer <key>`` or a token (always,
        when none is set)."""
        if self.api_key is None:
            return True
        header = authorization or ""
        given = header[7:] if header.lower().startswith("bearer ") else token or ""
        return secrets.compare_digest(given.encode(), self.api_key.encode())


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float, kind: type) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}; use a value from {lo:g} to {hi:g}")
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={raw!r} is out of range; use a value from {lo:g} to {hi:g}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(allowed)}")
    return raw
