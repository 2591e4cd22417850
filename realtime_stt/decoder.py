"""The decodes that run in worker threads: every call into faster-whisper's
internals (encode, get_prompt, find_alignment, merge_punctuations, get_suppressed_tokens) is here,
against the versions pinned in requirements.txt.

Three decodes: a batch of partial windows from many sessions (VAD, one encode, language detection
where none is given, one greedy generate, word alignment); a final of up to 30 s (one encode,
untimed decode, word alignment); and a longer final, as offline faster-whisper decodes it. An
uploaded file is read with PyAV as faster-whisper reads one and decoded as offline faster-whisper
decodes it, one 30 s window at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import (
    get_suppressed_tokens,
    merge_punctuations,
    restore_speech_timestamps,
)
from faster_whisper.vad import (
    SpeechTimestampsMap,
    collect_chunks,
    get_speech_timestamps,
)

from realtime_stt.features import window_features
from realtime_stt.frontend import Heard
from realtime_stt.model import encoded_here, load_model
from realtime_stt.settings import SAMPLE_RATE, Settings
from realtime_stt.vad import VAD_OPTIONS
from realtime_stt.words import Word, join_words

N_FRAMES = 3000  # Whisper's 30 s window in mel frames
WINDOW_SAMPLES = N_FRAMES * SAMPLE_RATE // 100
MAX_TOKENS = 448  # Whisper's decoder length
NO_SPEECH_THRESHOLD = 0.6  # faster-whisper's defaults
LOGPROB_THRESHOLD = -1.0
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
PROMPT_BUCKETS = (0, 8, 16, 32, 48)  # prompt lengths a batch is cut to


class Voided(Exception):
    """The decode was stopped between its steps: whoever asked no longer wants it."""


@dataclass(frozen=True)
class DecodeOptions:
    language: str | None
    task: str = "transcribe"
    beam_size: int = 1
    prompt: str | None = None
    # Partials take greedy output as it is: temperature fallback re-decodes up to six times, and
    # the next partial comes half a second later anyway.
    temperatures: tuple[float, ...] = (0.0,)
    # Bounds a runaway decode (a loop on a second of audio would otherwise run to 448 tokens).
    # Whisper keeps at most 223 prompt tokens, so up to 220 new ones always fit its 448.
    max_new_tokens: int | None = None
    encoder: EncoderSpan | None = None  # partial batches and finals of one window; None: Whisper's full 30 s
    # A whole-utterance final decodes as plain offline faster-whisper does: each 30 s window
    # conditioned on the text of the one before (dropping that raised the long-form WER); loops stay
    # bounded by the compression-ratio fallback, which resets that context, and repetition_start.
    offline: bool = False


@dataclass(frozen=True)
class EncoderSpan:
    """How many mel frames (100 a second) the encoder sees: the audio, then ``margin`` frames of
    Whisper's silence padding, at least ``floor`` frames in all.

    Whisper was trained on 30 s windows: the bare audio alone makes it loop, but some padding
    reads as well as the full 30 s, for partials and for finals decoded without timestamps, at a
    fraction of the cost (README).
    """

    floor: int
    margin: int

    def width(self, frames: int) -> int:
        """Mel frames the encoder sees for windows of up to ``frames`` frames (an even number)."""
        width = min(N_FRAMES, max(self.floor, frames + self.margin))
        return width + width % 2


# The padding is what reads well, not the total: on windows of 1-6.5 s of the English files, 10 s
# of padding gave the same text as 15 s at least (README), and a short window costs less with it.
PARTIAL_ENCODER = EncoderSpan(floor=1000, margin=1000)
# A final of one window: its audio and 10 s of padding, 15 s at least; it read the eval files as 30 s
# did in half the time (README, "Finals"). Longer finals keep offline faster-whisper's 30 s windows.
FINAL_ENCODER = EncoderSpan(floor=1500, margin=1000)
# A batch of three or more partials means load, where cadence matters more: 8 s and 5 s (a loaded
# machine keeps its windows near half WINDOW_SECONDS, pipeline.py, so mostly 8 s).
BUSY_PARTIAL_ENCODER = EncoderSpan(floor=800, margin=500)
def token_budget(seconds: float) -> int:
    """Generous room for speech (about 3 words, 5 tokens, a second) that still stops a loop early."""
    return min(220, 24 + int(12 * seconds))


@dataclass(frozen=True)
class Transcript:
    words: tuple[Word, ...]
    language: str | None
    aligned: bool = True  # False: each word carries its segment's times (a final longer than 30 s)
    # Where the language was detected on this audio: how sure Whisper was, and how much speech it heard.
    language_probability: float = 1.0
    speech_seconds: float = 0.0

    @property
    def text(self) -> str:
        return join_words(self.words)


@dataclass(frozen=True)
class Segment:
    """One segment of a file's decode, as offline faster-whisper gives it; times in seconds of the file."""

    id: int
    seek: int
    start: float
    end: float
    text: str  # with Whisper's leading space
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] = ()  # only when word timestamps were asked for


class Decoder:
    """The loaded model, and the decodes it runs (each call blocks: run it in a worker thread)."""

    def __init__(self, settings: Settings, workers: int | None = None) -> None:
        self.settings = settings
        self.model, self.device, self.workers = load_model(settings, workers)
        self.busy_span_always = False  # calibration sets it where the 15 s span is too slow for one speaker
        self.languages: tuple[str, ...] = tuple(self.model.supported_languages)
        self.multilingual: bool = bool(self.model.model.is_multilingual)
        # large-v3-turbo was fine-tuned on transcription only: its translations are not English.
        self.can_translate = self.multilingual and "turbo" not in settings.model_id.lower()
        self._tokenizers: dict[tuple[str, str], Tokenizer] = {}

    def decode(self, audio: np.ndarray, options: DecodeOptions, voided: Callable[[], bool] | None = None,
               heard: Heard | None = None) -> Transcript:
        if options.offline and audio.size <= WINDOW_SAMPLES:
            return self.decode_window(audio, options, voided, heard)
        segments, info = self.model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            beam_size=options.beam_size,
            initial_prompt=options.prompt or None,
            temperature=list(options.temperatures),
            max_new_tokens=options.max_new_tokens,
            word_timestamps=not options.offline,
            vad_filter=True,
            # Conditioning on the decoder's own output is what makes Whisper loop on streams; the
            # committed text goes in as a prompt instead.
            condition_on_previous_text=options.offline,
        )
        segments = list(segments)
        if options.offline:
            # Without alignment a word carries its segment's times: enough for the text and loop check.
            words = tuple(
                Word(float(s.start), float(s.end), token)
                for s in segments
                for token in re.findall(r"\s*\S+", s.text)
            )
            return Transcript(words, info.language, aligned=False, language_probability=info.language_probability)
        words = tuple(
            Word(float(w.start), float(w.end), w.word, float(w.probability)) for s in segments for w in (s.words or ())
        )
        return Transcript(words, info.language, language_probability=info.language_probability)

    def decode_window(self, audio: np.ndarray, options: DecodeOptions, voided: Callable[[], bool] | None = None,
                      heard: Heard | None = None) -> Transcript:
        """An utterance that fits one 30 s window, decoded as offline faster-whisper would, without
        timestamp tokens, then aligned word by word.

        Timestamp tokens only serve to seek to the next window: a decode that ended before the audio
        did seeks there and runs again. The alignment, one decoder pass over the text, gives each word
        its time, so the session can tell where the decode stopped reading. The encoder runs once:
        language detection and the alignment use its output, and transcribe is handed it back. A
        stream's final (``heard``) takes its speech chunks from the VAD scores its session kept.
        """
        model = self.model
        chunks = speech_chunks(audio) if heard is None else heard.spans(audio.size)
        if not chunks:
            return Transcript((), options.language, language_probability=0.0)
        speech = np.concatenate([audio[c["start"] : c["end"]] for c in chunks])
        # Features computed afresh, not the kept frames (equal within float rounding): on int8 weights
        # that rounding flipped a word now and then, and a final must not depend on partials' timing.
        features = model.feature_extractor(speech)
        frames = min(N_FRAMES, features.shape[-1] - 1)  # what transcribe's one segment holds
        segment = pad_or_trim(features[:, :frames])
        encoded = WhisperModel.encode(model, np.ascontiguousarray(segment[:, : self._width(frames, options.encoder)]))
        language, probability = options.language or (None if self.multilingual else "en"), 1.0
        if language is None:
            [found] = model.model.detect_language(encoded)
            language, probability = found[0][0][2:-2], float(found[0][1])
        if voided is not None and voided():  # asked once the encoder has run: the decoder's steps are most of the cost
            raise Voided
        token = encoded_here.set((segment, encoded))
        try:
            segments, _ = model.transcribe(
                speech,
                language=language,
                task=options.task,
                beam_size=options.beam_size,
                initial_prompt=options.prompt or None,
                temperature=list(options.temperatures),
                max_new_tokens=options.max_new_tokens,
                without_timestamps=True,
                vad_filter=False,
            )
            segments = list(segments)
        finally:
            encoded_here.reset(token)
        tokenizer = self._tokenizer(options.task, language)
        tokens = [t for s in segments for t in s.tokens if t < tokenizer.eot]
        [alignment] = model.find_alignment(tokenizer, [tokens], encoded, frames) if tokens else [[]]
        words = _aligned_words(SpeechTimestampsMap(chunks, SAMPLE_RATE), alignment)
        return Transcript(words, language, language_probability=probability, speech_seconds=speech.size / SAMPLE_RATE)

    def file_language(self, audio: np.ndarray, chunks: list[dict]) -> tuple[str, float]:
        """The language of a file and its probability, detected as offline faster-whisper detects it:
        on the first 30 s of its speech (one encode, one decoder step)."""
        speech = np.concatenate([audio[c["start"] : c["end"]] for c in chunks])[:WINDOW_SAMPLES]
        language, probability, _ = self.model.detect_language(speech)
        return language, float(probability)

    def file_segments(self, audio: np.ndarray, chunks: list[dict], options: DecodeOptions, words: bool) -> Iterator[Segment]:
        """A file's segments as plain offline faster-whisper decodes them (``transcribe`` with
        ``vad_filter``: its speech, ``chunks``, cut out and joined, each 30 s window conditioned on
        the text before). ``options.language`` must be set, so that this call runs no model: it
        computes the features and returns a lazy iterator, each ``next`` of which runs at most one
        window's decode (and its word alignment when ``words``), or none when the window's segments
        are already decoded."""
        speech = np.concatenate(collect_chunks(audio, chunks)[0])
        segments, _ = self.model.transcribe(
            speech,
            language=options.language,
            task=options.task,
            beam_size=options.beam_size,
            initial_prompt=options.prompt or None,
            temperature=list(options.temperatures),
            word_timestamps=words,
            vad_filter=False,
            condition_on_previous_text=True,
        )
        return (_segment(s) for s in restore_speech_timestamps(segments, chunks, SAMPLE_RATE))

    def decode_batch(
        self, audios: Sequence[np.ndarray], each: Sequence[DecodeOptions], heard: Sequence[Heard | None] | None = None
    ) -> list[Transcript]:
        """Decode several sessions' windows (at most 30 s each) in one batch.

        What ``transcribe`` does for one window, done for all at once: VAD, log-mel features padded
        to one width, one encode, language detection for the windows that name none, one greedy
        generate (without timestamp tokens: word alignment gives the times), one word alignment per
        language. A batch of 8 costs the decoder about 3 times one (tiny.en, 2 cores). A window that
        comes with what its session ``heard`` takes its VAD and features from there (features.py).
        """
        heard = heard or [None] * len(audios)
        options = each[0]  # task, beam size and encoder span are the same for all
        text_tokenizer = self._tokenizer(options.task, options.language or "en")  # encoding is language-free
        results = [Transcript((), item.language, language_probability=0.0) for item in each]
        busy = len(audios) > 2  # a batch this big means load: cadence comes first
        rows = []
        for index, (audio, item, seen) in enumerate(zip(audios, each, heard)):
            chunks = speech_chunks(audio) if seen is None else seen.spans(audio.size)
            if chunks:  # else silence: nothing to decode
                previous = text_tokenizer.encode(" " + item.prompt.strip()) if item.prompt else []
                rows.append((index, audio, item, chunks, previous, seen))
        # CTranslate2 wants the start-of-transcript token at one position in the whole batch, so
        # prompts are cut to a few lengths (the latest tokens kept) and batched per length. A busy
        # batch cuts them all to its shortest, for one generate.
        common = min((len(row[4]) for row in rows), default=0) if busy else MAX_TOKENS
        groups: dict[int, list[_Voiced]] = {}
        filters = self.model.feature_extractor.mel_filters
        for index, audio, item, chunks, previous, seen in rows:
            keep = max(n for n in PROMPT_BUCKETS if n <= min(len(previous), common))
            spans = [(c["start"], c["end"]) for c in chunks]
            features = (window_features(seen.kept, audio, seen.start, spans, filters) if seen is not None else
                        self.model.feature_extractor(np.concatenate([audio[a:b] for a, b in spans]))[:, :-1])
            voiced = _Voiced(
                index,
                features,
                sum(c["end"] - c["start"] for c in chunks),
                SpeechTimestampsMap(chunks, SAMPLE_RATE),
                previous[len(previous) - keep :],
                item.max_new_tokens or MAX_TOKENS // 2,
                item.language,
            )
            groups.setdefault(keep, []).append(voiced)
        span = BUSY_PARTIAL_ENCODER if (busy or self.busy_span_always) and options.encoder is not None else options.encoder
        for group in groups.values():
            for voiced, transcript in zip(group, self._decode_group(group, options, span)):
                results[voiced.index] = transcript
        return results

    def _tokenizer(self, task: str, language: str) -> Tokenizer:
        """One per task and language, kept: it caches what every batch asks of it (the tokens
        suppressed, the start sequence), which took longer to build than the batch's own Python."""
        key = (task, language)
        tokenizer = self._tokenizers.get(key)
        if tokenizer is None:  # two workers may both build one: either is the same
            tokenizer = self._tokenizers[key] = Tokenizer(self.model.hf_tokenizer, self.multilingual, task=task, language=language)
        return tokenizer

    def _decode_group(self, group: Sequence[_Voiced], options: DecodeOptions, span: EncoderSpan | None) -> list[Transcript]:
        features = [v.features for v in group]
        frames = [f.shape[-1] for f in features]
        encoded, borrowed = self._encode(features, span)  # borrowed: memory the encoder output uses
        languages = self._languages(group, encoded)
        tokenizers = [self._tokenizer(options.task, language) for language, _ in languages]
        texts = self._generate(group, encoded, tokenizers, options)
        alignments = self._align(encoded, frames, texts, [language for language, _ in languages], tokenizers)
        del borrowed
        return [
            Transcript(
                _aligned_words(voiced.time_map, alignment),
                language,
                language_probability=probability,
                speech_seconds=voiced.samples / SAMPLE_RATE if tokens else 0.0,
            )
            for voiced, tokens, alignment, (language, probability) in zip(group, texts, alignments, languages)
        ]

    def _encode(self, features: list[np.ndarray], span: EncoderSpan | None) -> tuple[Any, np.ndarray | None]:
        """The encoder output of every window, padded to one width; and the array it borrows, if any."""
        model = self.model
        width = self._width(max(f.shape[-1] for f in features), span)
        batch = np.stack([np.pad(f[:, :width], ((0, 0), (0, width - min(f.shape[-1], width)))) for f in features])
        if self.device == "cpu" and len(batch) > 2:
            # Two windows at a time: on CPU one encode of 8 takes longer than four of 2 (README).
            pairs = np.concatenate([np.asarray(WhisperModel.encode(model, batch[i : i + 2])) for i in range(0, len(batch), 2)])
            return ctranslate2.StorageView.from_array(pairs), pairs
        return WhisperModel.encode(model, batch), None

    def _width(self, frames: int, span: EncoderSpan | None) -> int:
        """The frames an encode of ``frames`` frames of features gets: the span's width, or the whole window."""
        return span.width(frames) if self.settings.trim_encoder_input and span is not None else N_FRAMES

    def _languages(self, group: Sequence[_Voiced], encoded: Any) -> list[tuple[str, float]]:
        """Each window's language and its probability: as given, or detected (one decoder step on
        the encoder output already there, so detection costs next to nothing)."""
        languages = [(v.language or (None if self.multilingual else "en"), 1.0) for v in group]
        if all(language is not None for language, _ in languages):
            return languages
        detected = self.model.model.detect_language(encoded)
        return [
            given if given[0] is not None else (found[0][0][2:-2], float(found[0][1]))
            for given, found in zip(languages, detected)
        ]

    def _generate(self, group: Sequence[_Voiced], encoded: Any, tokenizers: list[Tokenizer], options: DecodeOptions) -> list[list[int]]:
        """One greedy generate for the whole group: each window's text tokens, none for silence."""
        model = self.model
        prompts = [model.get_prompt(t, v.previous, without_timestamps=True) for t, v in zip(tokenizers, group)]
        tokenizer = tokenizers[0]  # special tokens and suppression are the same in every language
        generated = model.model.generate(
            encoded,
            prompts,
            beam_size=options.beam_size,
            max_length=min(MAX_TOKENS, len(prompts[0]) + max(v.budget for v in group)),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )
        texts = []
        for result, voiced in zip(generated, group):
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot][: voiced.budget]
            average_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            # Whisper's own silence test: likely no speech, and not confident in what it wrote.
            silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and average_logprob < LOGPROB_THRESHOLD
            texts.append([] if silent else tokens)
        return texts

    def _align(
        self, encoded: Any, frames: list[int], texts: list[list[int]], languages: list[str], tokenizers: list[Tokenizer]
    ) -> list[list[dict]]:
        """Word alignment of each window's text. It starts from one language's tokens for the whole
        batch: once per language present, every row aligned (the encoder output is one batch), the
        other rows given a placeholder."""
        alignments: list[list[dict]] = [[] for _ in texts]
        placeholder = [tokenizers[0].eot - 1]
        for language in dict.fromkeys(languages):
            rows = [i for i, row_language in enumerate(languages) if row_language == language and texts[i]]
            if not rows:
                continue
            aligned = self.model.find_alignment(
                tokenizers[rows[0]], [texts[i] if i in rows else placeholder for i in range(len(texts))], encoded, frames
            )
            for i in rows:
                alignments[i] = aligned[i]
        return alignments


@dataclass(frozen=True)
class _Voiced:
    """One window of a batch after VAD: its speech's features, and the map back to the window's times."""

    index: int
    features: np.ndarray  # log-mel of its speech alone (mels x frames)
    samples: int  # of speech
    time_map: SpeechTimestampsMap
    previous: list[int]  # prompt tokens
    budget: int
    language: str | None  # None: detect it on this window


def _aligned_words(time_map: SpeechTimestampsMap, alignment: list[dict]) -> tuple[Word, ...]:
    """Aligned words, their times mapped from the speech alone back to the audio it was cut from."""
    merge_punctuations(alignment, PREPEND_PUNCTUATION, APPEND_PUNCTUATION)
    words = []
    for word in alignment:
        if not word["word"]:
            continue
        chunk = time_map.get_chunk_index((word["start"] + word["end"]) / 2)
        words.append(
            Word(
                time_map.get_original_time(float(word["start"]), chunk),
                time_map.get_original_time(float(word["end"]), chunk),
                word["word"],
                float(word["probability"]),
            )
        )
    return tuple(words)


def _segment(segment: Any) -> Segment:
    words = tuple(Word(float(w.start), float(w.end), w.word, float(w.probability)) for w in segment.words or ())
    return Segment(
        segment.id, segment.seek, float(segment.start), float(segment.end), segment.text, tuple(segment.tokens),
        float(segment.temperature or 0.0), float(segment.avg_logprob), float(segment.compression_ratio),
        float(segment.no_speech_prob), words,
    )


def speech_chunks(audio: np.ndarray) -> list[dict]:
    """Where the speech is in some audio, as offline faster-whisper's VAD filter finds it (sample
    ranges): a session's window, a final, or an uploaded file."""
    return get_speech_timestamps(audio, VAD_OPTIONS) if audio.size else []
