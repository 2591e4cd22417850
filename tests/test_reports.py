"""The suite's own reports: a failing test gets pytest's normal report, never INTERNALERROR."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

# What the protocol fuzz leaves for the garbage collector, in small: objects in cycles whose
# finalizers raise (an asyncio transport whose loop is closed), then a test that fails. The file is
# long, as test files are, so that pytest's parse of it for the report allocates enough for the
# collector to run in the middle (tests/gc_safe_parse.py says why that broke pytest).
LATER = '''
class Leaky:
    def __del__(self):
        self.loop["closed"] + 1


def test_a_later_failure():
    for _ in range(5000):
        leaky = Leaky()
        leaky.loop, leaky.me = {}, leaky
    del leaky
    assert 1 == 2, "a later test fails"
''' + "".join(f"CONSTANT_{i} = [{i}, {i} + 1, ({i}, 'x')]\n" for i in range(3000))


def test_a_failure_after_garbage_whose_finalizers_raise_gets_the_normal_report(tmp_path):
    (tmp_path / "test_later.py").write_text(LATER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gc_safe_parse", "test_later.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert "INTERNALERROR" not in result.stdout + result.stderr, result.stdout[-3000:]
    assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout[-3000:]
    assert "a later test fails" in result.stdout  # the failure itself, reported
