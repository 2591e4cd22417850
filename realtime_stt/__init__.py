"""Realtime speech-to-text over WebSocket on one shared faster-whisper model (see main.py for the map)."""
