"""Loading the model: where it runs, how many calls at once, and the clear error when it cannot be
loaded; the one change made to faster-whisper's model (an encode given back, not run again); and
the memory its calls free, kept by the C allocator for the next call."""

from __future__ import annotations

import contextvars
import os
import re

# oneDNN keeps a compiled primitive for every matrix shape it meets, up to 1024 of them; encoder
# inputs change shape with every window, so the cache grew the server's memory for minutes and gave
# no speed back (README, "Memory"). A small cache keeps the shapes that repeat (decoder steps).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
import ctypes
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from threadpoolctl import threadpool_limits

from realtime_stt.settings import Settings


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_FREED_BYTES = 1 << 30
MALLOC_ENVIRONMENT = ("MALLOC_", "GLIBC_TUNABLES")  # variables that tune glibc's malloc: the operator's choice


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Have glibc's malloc keep the memory the model frees, for its next call: one heap for all
    threads, no buffer of its own mapping, nothing handed back to the kernel (up to 1 GiB free).

    CTranslate2 allocates and frees its buffers on every call (the logits over Whisper's vocabulary
    at each step and each aligned position). Left alone, glibc gave its threads heaps of their own,
    served the large buffers from fresh mappings and handed them back, so every call page-faulted
    them in again: half the model threads' CPU was the kernel's (README, "The server's own cost").
    It must run before the model's threads first allocate: model.py's import is before them (uvicorn
    imports the app before it serves). Not done where the environment sets a MALLOC_ tunable (the
    operator's choice stands), nor on another C library.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith(MALLOC_ENVIRONMENT) for name in environ):
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return all(mallopt(option, value) == 1 for option, value in
               ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_FREED_BYTES), (M_TRIM_THRESHOLD, KEEP_FREED_BYTES)))


FREED_MEMORY_KEPT = keep_freed_memory()


class ModelLoadError(RuntimeError):
    """The model named by MODEL_ID could not be loaded."""


# Features this thread's decode already encoded, and their encoder output: given back, not recomputed.
encoded_here: contextvars.ContextVar[tuple[np.ndarray, Any] | None] = contextvars.ContextVar("encoded", default=None)


class ReusingWhisperModel(WhisperModel):
    """faster-whisper that does not encode again what the decode in this thread just encoded
    (held in a context variable, not in state on the shared model)."""

    def encode(self, features: np.ndarray) -> Any:
        done = encoded_here.get()
        if done is not None and done[0].shape == features.shape and np.array_equal(done[0], features):
            return done[1]
        return super().encode(features)


def device_of(settings: Settings) -> str:
    if settings.device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return settings.device


def load_model(settings: Settings, workers: int | None = None) -> tuple[Any, str, int]:
    """The model, the device it runs on, and how many calls it runs at once (``workers``, else
    INFERENCE_WORKERS, else one)."""
    model_id = settings.model_id
    hint = (
        "Set MODEL_ID to a local CTranslate2 Whisper directory (one holding model.bin, config.json and "
        "tokenizer.json), e.g. MODEL_ID=/models/faster-whisper-large-v3-turbo, or give this machine access "
        "to the Hugging Face hub."
    )
    looks_like_path = model_id.startswith((".", "/", "~")) or os.sep in model_id and not _is_hub_id(model_id)
    if looks_like_path and not Path(model_id).expanduser().is_dir():
        raise ModelLoadError(f"MODEL_ID={model_id!r}: no such directory. {hint}")
    device = device_of(settings)
    workers = workers or settings.inference_workers or 1
    # NumPy's BLAS keeps its threads spinning for a while after each call; the log-mel features'
    # one small matrix product woke them before every encode, and they then took the cores from
    # CTranslate2's threads (README, "CPU threads"). The model's threads get the cores to themselves.
    threadpool_limits(1, user_api="blas")
    try:
        model = ReusingWhisperModel(
            str(Path(model_id).expanduser()) if looks_like_path else model_id,
            device=device,
            compute_type=settings.compute_type,
            cpu_threads=max(1, settings.cpu_threads // workers),
            num_workers=workers,
        )
    except Exception as exc:
        raise ModelLoadError(f"MODEL_ID={model_id!r} could not be loaded ({type(exc).__name__}: {exc}). {hint}")
    return model, device, workers


def _is_hub_id(model_id: str) -> bool:
    """'Systran/faster-whisper-small' names a hub repository, not a relative path."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) is not None and not Path(model_id).exists()
