"""Benchmark of the realtime speech-to-text server: python -m bench --help."""
