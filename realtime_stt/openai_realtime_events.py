"""The pure parts of the OpenAI Realtime API's transcription sessions: the session's settings as the
client's events set them (the GA ``session.update`` and the beta ``transcription_session.update``)
and as the server's events show them, the error event, the input audio formats decoded to the
pipeline's 16 kHz, and server VAD's turns over Silero's scores. No sockets here; ``openai_realtime``
serves them.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import numpy as np
import soxr
from pydantic import BaseModel, ConfigDict, Field

from realtime_stt.settings import SAMPLE_RATE
from realtime_stt.vad import VAD_FRAME

# The formats a client may send, by the beta API's names: OpenAI's PCM is 24 kHz, G.711 is 8 kHz.
RATES = {"pcm16": 24_000, "g711_ulaw": 8_000, "g711_alaw": 8_000}
GA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
FRAME_MS = VAD_FRAME * 1000 // SAMPLE_RATE  # 32 ms: the VAD's frame
# Semantic VAD has no model here: it is served as server VAD, its eagerness a length of silence.
SEMANTIC_SILENCE_MS = {"low": 1200, "medium": 800, "auto": 800, "high": 500}
RELEASE = 0.15  # speech goes on while a frame scores this far under the threshold (Silero's own hysteresis)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class EventError(ValueError):
    """A client event the server cannot take; ``code`` and ``param`` as OpenAI's error has them."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


def error_event(message: str, code: str, param: str | None = None, client_event_id: str | None = None,
                kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's ``error`` event: the session goes on."""
    error = {"type": kind, "code": code, "message": message, "param": param, "event_id": client_event_id}
    return {"type": "error", "event_id": new_id("event"), "error": error}


# -- the session's settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vad:
    """Server VAD as served: OpenAI's defaults; ``asked`` says whether the client asked for semantic VAD."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    asked: str = "server_vad"


@dataclass(frozen=True)
class SessionConfig:
    model: str
    format: str = "pcm16"  # a key of RATES
    language: str | None = None  # None: the model's default (detection, or English for a .en model)
    prompt: str | None = None  # shown back, not used: the pipeline prompts Whisper with the words so far
    vad: Vad | None = Vad()  # None: turns end only on the client's commit
    noise_reduction: str | None = None  # shown back, not applied
    include: tuple[str, ...] | None = None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerVad(_Strict):
    type: Literal["server_vad"]
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(default=None, ge=0, le=60_000)
    create_response: bool | None = None  # no responses in a transcription session: accepted, unused
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = None


class SemanticVad(_Strict):
    type: Literal["semantic_vad"]
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None


class Transcription(_Strict):
    model: str | None = None  # shown back; the loaded model answers
    language: str | None = None
    prompt: str | None = None
    languages: list[str] | None = None  # one: that language; more: detected
    keywords: list[str] | None = None  # accepted, unused
    delay: Literal["minimal", "low", "medium", "high", "xhigh"] | None = None  # accepted, unused


class NoiseReduction(_Strict):
    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = None


class PcmFormat(_Strict):
    type: Literal["audio/pcm"]
    rate: Literal[24000] = 24000


class G711Format(_Strict):
    type: Literal["audio/pcmu", "audio/pcma"]


class AudioInput(_Strict):
    format: Annotated[PcmFormat | G711Format, Field(discriminator="type")] | None = None
    transcription: Transcription | None = None
    turn_detection: Annotated[ServerVad | SemanticVad, Field(discriminator="type")] | None = None
    noise_reduction: NoiseReduction | None = None


class Audio(_Strict):
    input: AudioInput | None = None


class GaSession(_Strict):
    type: Literal["transcription"]
    audio: Audio | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


class GaUpdate(_Strict):
    type: Literal["session.update"]
    event_id: str | None = None
    session: GaSession


class BetaTurnDetection(_Strict):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(default=None, ge=0, le=60_000)
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None


class BetaSession(_Strict):
    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None
    input_audio_transcription: Transcription | None = None
    turn_detection: BetaTurnDetection | None = None
    input_audio_noise_reduction: NoiseReduction | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    client_secret: dict[str, Any] | None = None


class BetaUpdate(_Strict):
    type: Literal["transcription_session.update"]
    event_id: str | None = None
    session: BetaSession


class Append(_Strict):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str


class Commit(_Strict):
    type: Literal["input_audio_buffer.commit", "input_audio_buffer.clear"]
    event_id: str | None = None


def check_session_type(message: dict[str, Any]) -> None:
    """A conversation session (``session.type: realtime``) is not served: say so plainly."""
    session = message.get("session")
    if isinstance(session, dict) and session.get("type", "transcription") != "transcription":
        raise EventError("this server serves transcription sessions only: set session.type to 'transcription' "
                         "(and connect with ?intent=transcription)", "unsupported_session_type", "session.type")


def updated(config: SessionConfig, update: GaUpdate | BetaUpdate) -> SessionConfig:
    """The settings after an update: what it names changes, the rest stays (as OpenAI merges)."""
    changes: dict[str, Any] = {}
    if isinstance(update, GaUpdate):
        given = update.session.audio.input if update.session.audio and update.session.audio.input else AudioInput()
        if given.format is not None:
            changes["format"] = next(k for k, v in GA_FORMATS.items() if v == given.format.type)
        transcription, noise = given.transcription, given.noise_reduction
        detection: ServerVad | SemanticVad | BetaTurnDetection | None = given.turn_detection
        names = {name for name in given.model_fields_set if name in ("turn_detection", "noise_reduction")}
        include = update.session.include
    else:
        session = update.session
        if session.input_audio_format is not None:
            changes["format"] = session.input_audio_format
        transcription, noise = session.input_audio_transcription, session.input_audio_noise_reduction
        detection = session.turn_detection
        names = {{"input_audio_noise_reduction": "noise_reduction"}.get(n, n) for n in session.model_fields_set}
        include = session.include
    if transcription is not None:
        for name in transcription.model_fields_set & {"model", "language", "prompt"}:
            changes[name] = getattr(transcription, name)
        if transcription.languages is not None:
            changes["language"] = transcription.languages[0] if len(transcription.languages) == 1 else None
    if "turn_detection" in names:
        changes["vad"] = None if detection is None else _vad(detection)
    if "noise_reduction" in names:
        changes["noise_reduction"] = noise.type if noise is not None else None
    if include is not None:
        changes["include"] = tuple(include)
    return replace(config, **changes)


def _vad(given: ServerVad | SemanticVad | BetaTurnDetection) -> Vad:
    if given.type == "semantic_vad":
        eagerness = getattr(given, "eagerness", None) or "auto"
        return Vad(silence_duration_ms=SEMANTIC_SILENCE_MS[eagerness], asked="semantic_vad")
    default = Vad()
    return Vad(
        default.threshold if given.threshold is None else given.threshold,
        default.prefix_padding_ms if given.prefix_padding_ms is None else given.prefix_padding_ms,
        default.silence_duration_ms if given.silence_duration_ms is None else given.silence_duration_ms,
    )


def vad_json(vad: Vad | None) -> dict[str, Any] | None:
    """Turn detection as served: semantic VAD shows as the server VAD that serves it."""
    if vad is None:
        return None
    return {"type": "server_vad", "threshold": vad.threshold, "prefix_padding_ms": vad.prefix_padding_ms,
            "silence_duration_ms": vad.silence_duration_ms}


def ga_session(config: SessionConfig, session_id: str) -> dict[str, Any]:
    """The session as GA's ``session.created`` / ``session.updated`` show a transcription session."""
    audio_format: dict[str, Any] = {"type": GA_FORMATS[config.format]}
    if config.format == "pcm16":
        audio_format["rate"] = RATES["pcm16"]
    audio_input = {
        "format": audio_format,
        "transcription": {"model": config.model, "language": config.language, "prompt": config.prompt},
        "turn_detection": vad_json(config.vad),
        "noise_reduction": {"type": config.noise_reduction} if config.noise_reduction else None,
    }
    return {"type": "transcription", "object": "realtime.transcription_session", "id": session_id,
            "audio": {"input": audio_input}, "include": list(config.include) if config.include else None}


def beta_session(config: SessionConfig, session_id: str) -> dict[str, Any]:
    """The session as the beta ``transcription_session.created`` / ``.updated`` show it."""
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "modalities": ["text"],
        "input_audio_format": config.format,
        "input_audio_transcription": {"model": config.model, "language": config.language, "prompt": config.prompt},
        "turn_detection": vad_json(config.vad),
        "input_audio_noise_reduction": {"type": config.noise_reduction} if config.noise_reduction else None,
        "include": list(config.include) if config.include else None,
    }


# -- audio ----------------------------------------------------------------------------------------


def _ulaw_table() -> np.ndarray:
    """G.711 mu-law byte -> int16: the byte is stored inverted; sign, 3-bit exponent, 4-bit mantissa,
    with the bias of 0x84 taken off."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (code >> 4) & 7, code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """G.711 A-law byte -> int16: even bits stored inverted (xor 0x55); a set sign bit is positive;
    segment 0 is linear, the others add the leading one."""
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (code >> 4) & 7, code & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


G711 = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


class AudioDecoder:
    """One format's bytes, as they come in ``input_audio_buffer.append`` events, to int16 16 kHz
    samples: a streaming soxr resampler, so chunk edges leave no seams (it holds back a few ms)."""

    def __init__(self, audio_format: str) -> None:
        self.format = audio_format
        self._odd = b""
        self._resampler = soxr.ResampleStream(RATES[audio_format], SAMPLE_RATE, 1, dtype="int16")

    def decode(self, data: bytes) -> np.ndarray:
        if self.format == "pcm16":
            data = self._odd + data
            usable = len(data) - len(data) % 2
            self._odd = data[usable:]
            samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)
        else:
            samples = G711[self.format][np.frombuffer(data, dtype=np.uint8)]
        return self._resampler.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """What the resampler still holds, at the end of the client's buffer; it starts afresh."""
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        self.__init__(self.format)
        return tail


# -- server VAD -----------------------------------------------------------------------------------


class TurnDetector:
    """Server VAD over Silero's frame scores for one utterance: speech starts at the first frame that
    scores ``threshold``; it stops once ``silence_duration_ms`` of frames score below the threshold
    less RELEASE (the release Silero's own segmentation uses, so a soft syllable does not end a turn).
    After the stop it reads nothing more until ``reset`` (the next utterance)."""

    def __init__(self, vad: Vad) -> None:
        self.vad = vad
        self._silence_frames = max(1, math.ceil(vad.silence_duration_ms / FRAME_MS))
        self.reset()

    def reset(self) -> None:
        self.speaking = False
        self.heard = False  # speech started in this utterance
        self.over = False
        self.frames = 0  # frames read
        self._last_speech = -1

    def add(self, first: int, scores: np.ndarray) -> list[tuple[str, int]]:
        """Read the scores of frames ``first``...; ("started", frame) and ("stopped", end frame) as they happen."""
        events: list[tuple[str, int]] = []
        release = max(0.0, self.vad.threshold - RELEASE)
        for index, score in enumerate(scores.tolist(), start=first):
            if self.over:
                break
            if not self.speaking:
                if score >= self.vad.threshold:
                    self.speaking = self.heard = True
                    self._last_speech = index
                    events.append(("started", index))
            elif score >= release:
                self._last_speech = index
            elif index - self._last_speech >= self._silence_frames:
                self.speaking, self.over = False, True
                events.append(("stopped", index + 1))
        self.frames = max(self.frames, first + len(scores))
        return events
