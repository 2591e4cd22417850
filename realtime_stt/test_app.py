"""Which browser pages may open a socket."""

from __future__ import annotations

from realtime_stt.app import origin_allowed
from realtime_stt.settings import Settings


def test_origins():
    local = Settings().allowed_origins
    assert origin_allowed(None, "127.0.0.1:8717", local)  # not a browser
    assert origin_allowed("http://localhost:5173", "127.0.0.1:8717", local)
    assert origin_allowed("http://[::1]:8717", "[::1]:8717", local)
    assert origin_allowed("http://box.lan:8717", "box.lan:8717", local)  # the server's own page
    assert not origin_allowed("https://evil.example", "127.0.0.1:8717", local)
    assert not origin_allowed("http://localhost.evil.example", "127.0.0.1:8717", local)
    assert not origin_allowed("null", "127.0.0.1:8717", local)
    assert origin_allowed("https://app.example", "x", ("https://app.example",))
    assert not origin_allowed("http://app.example", "x", ("https://app.example",))
    assert origin_allowed("https://anything", "x", ("*",))
