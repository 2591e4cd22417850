"""Realtime speech-to-text over WebSocket, on one shared faster-whisper model.

Run: ``uvicorn main:app --host 127.0.0.1 --port 8717`` and open ``ws://127.0.0.1:8717/ws``: an
optional JSON config, binary int16 PCM (16 kHz mono), then ``{"type": "stop"}``; ``partial``
messages come while audio arrives and a ``final`` after the stop (README: the protocol in full).

The code, in ``realtime_stt/``, one module per concern; imports point down this list only:

- ``app``        the FastAPI app: loads the model in its lifespan, ``/health``, ``/metrics``, the
                 page at ``/``, ``/ws`` and ``/v1`` behind the API key and the allowed origins, the
                 sessions open, and the drain on SIGTERM/SIGINT that sends every final before a restart.
- ``protocol``   the seed WebSocket protocol (JSON messages, validation, close codes, idle and
                 slow-reader limits): a thin adapter that feeds a pipeline and sends what it gives
                 back, the newest partial only when the client reads slowly; and the socket session
                 (outbox, sender, receiver, close, drain) that every WebSocket protocol shares.
- ``openai_realtime``  OpenAI's Realtime API for transcription, ``/v1/realtime?intent=transcription``:
                 the same socket session and pipeline speaking OpenAI's events (session updates,
                 base64 audio, commits or server VAD, deltas of committed words, the final);
                 ``openai_realtime_events`` holds its pure parts (the events' shapes, G.711 and
                 resampling to 16 kHz, server VAD's turns over the pipeline's Silero scores).
- ``openai_api`` the OpenAI-compatible ``/v1/audio/transcriptions``, ``/v1/audio/translations`` and
                 ``/v1/models``: a thin adapter that reads a posted file and has the engine decode it
                 as offline faster-whisper does, one 30 s window per job below every live job.
- ``wyoming_server``  Home Assistant's Assist over the Wyoming protocol (TCP, ``WYOMING_PORT``):
                 a thin adapter that converts any PCM format to the pipeline's, feeds it, and sends
                 newly committed words as transcript chunks, then the final; bounded, with the
                 same admission and drain as ``/ws``.
- ``pipeline``   one speaker's utterances, with no knowledge of sockets or JSON: the audio,
                 partials on a shared clock grid, the speculative final, the final and its
                 read-on after a skipped stretch.
- ``engine``     the one shared model's queue and inference workers: finals before partials before
                 speculation before uploads, partials of all sessions batched, stale jobs dropped
                 unrun; every call's time goes to the live costs, which give the live capacity.
- ``calibration`` start-up: loads the model, times a few calls (the prior costs) and chooses the
                 working values (workers, batch size, cadence).
- ``capacity``   pure: from the costs of model calls (the prior, scaled by the live calls) to the
                 number of real-time speakers this machine serves, and the partial cadence.
- ``decoder``    the decodes, run in worker threads; every faster-whisper internal the server
                 calls is here (pinned in requirements.txt). A stream's final reads the VAD and
                 features its session kept, as its partials do.
- ``model``      loading the model (device, workers, the clear error), its encode given back,
                 and the memory its calls free kept for the next (glibc's malloc).
- ``audio_file`` an uploaded file read with PyAV as faster-whisper reads one, counted as it goes.
- ``policy``     pure streaming rules: LocalAgreement (what is committed, what is shown), when a
                 detected language is settled, guards against loops and re-read words.
- ``frontend``   an utterance's audio buffer, and every session's new audio scored in rounds, one
                 worker-thread call for all: the VAD scores and log-mel frames each utterance keeps.
- ``features``   Whisper's log-mel frames, each computed once and kept; a partial window's
                 features are its kept frames, its edges computed again (equal to faster-whisper's).
- ``vad``        Silero speech activity, scored as the audio arrives, and a window's speech chunks
                 found from those scores.
- ``metrics``    every counter the server keeps, as Prometheus metrics (``/health`` reads them too).
- ``words``, ``settings``   the Word type and the environment's settings, used by all the above.

How audio becomes text: a binary frame reaches ``protocol``, which hands it to ``pipeline.feed``.
The pipeline's speech watcher has it scored (``vad``) and its log-mel frames kept (``features``) in
the engine's ``frontend``; its partial-maker wakes on the next grid point and submits the current
window to the ``engine`` queue, where a worker batches it with the other sessions' windows and runs
``decoder.decode_batch`` in a thread. The words come back to the
pipeline, ``policy`` decides what is committed and shown, and the ``Partial`` goes through the
callback to ``protocol``, which sends the JSON. On stop, ``pipeline.finish`` decodes the whole
utterance again (or takes the decode it started when the speech stopped) and the ``final`` goes out.
"""

from realtime_stt.app import create_app

app = create_app()
