"""ast.parse with the garbage collector held off, so that pytest's report of a failing test cannot end
in INTERNALERROR (imported by conftest.py; a pytest plugin of its own: ``-p gc_safe_parse``).

Why: in CPython 3.11 (3.11.7 here) ast.parse keeps its recursion depth in one counter per
interpreter. A parse that runs inside another (or beside it, in a second thread) resets it, and the
outer parse then fails with "SystemError: AST constructor recursion depth mismatch". pytest parses
source with ast.parse when it reports a failure (the failing statement's lines) and when it rewrites
the asserts of a module imported late (hypothesis', anyio's). If the garbage collector runs in the
middle of that parse and frees an object whose finalizer raises (an asyncio transport or a socket
left behind by a test, as the protocol fuzz's hundreds of connections leave), pytest's
unraisable-exception hook formats the traceback, and Python 3.11's traceback module parses the
source line to place its ^^^ marks: a parse inside the parse. The collector is what lets other code
run in the middle of one, so it waits until the parse is done (it runs at the next allocation).
"""

from __future__ import annotations

import ast
import gc
import threading

_parse = ast.parse
_lock = threading.Lock()
_parsing = 0  # parses under way, in all threads
_collector_was_on = False


def parse(*args, **kwargs):
    global _parsing, _collector_was_on
    with _lock:
        if _parsing == 0:
            _collector_was_on = gc.isenabled()
            gc.disable()
        _parsing += 1
    try:
        return _parse(*args, **kwargs)
    finally:
        with _lock:
            _parsing -= 1
            if _parsing == 0 and _collector_was_on:
                gc.enable()


if getattr(ast.parse, "__module__", None) != __name__:  # once, however often this is imported
    ast.parse = parse
