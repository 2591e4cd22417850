"""The package's layout holds: imports point one way, and nothing imports the app."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# Each module and the package modules it may import: protocol adapters (protocol, openai_api,
# wyoming_server, openai_realtime, which shares protocol's socket session) -> pipeline -> engine,
# policy, VAD -> settings.
ALLOWED = {
    "app": {"protocol", "openai_api", "wyoming_server", "openai_realtime", "engine", "model", "metrics", "settings"},
    "protocol": {"pipeline", "engine", "settings"},
    "openai_api": {"pipeline", "engine", "decoder", "audio_file", "metrics", "settings"},
    "wyoming_server": {"pipeline", "engine", "metrics", "settings"},
    "openai_realtime": {"protocol", "openai_realtime_events", "pipeline", "engine", "vad", "settings"},
    "openai_realtime_events": {"vad", "settings"},
    "pipeline": {"engine", "decoder", "features", "frontend", "policy", "vad", "settings", "words"},
    "engine": {"calibration", "capacity", "decoder", "frontend", "metrics", "settings"},
    "calibration": {"capacity", "decoder", "model", "features", "settings"},
    "decoder": {"features", "frontend", "model", "vad", "settings", "words"},
    "model": {"settings"},
    "frontend": {"features", "vad"},
    "features": set(),
    "audio_file": {"settings"},
    "capacity": set(),
    "metrics": set(),
    "policy": {"words"},
    "vad": {"settings"},
    "words": set(),
    "settings": set(),
}


def package_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("realtime_stt."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("realtime_stt."))
    return names


def test_imports_point_one_way():
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith(("test_", "__"))}
    assert modules == set(ALLOWED), "a module was added or removed: place it in ALLOWED"
    for module in modules:
        assert package_imports(PACKAGE / f"{module}.py") <= ALLOWED[module], module


def test_main_is_the_map_and_the_app():
    tree = ast.parse((PACKAGE.parent / "main.py").read_text())
    assert ast.get_docstring(tree) and all(m in ast.get_docstring(tree) for m in ALLOWED)
    assert [ast.unparse(node) for node in tree.body[1:]] == ["from realtime_stt.app import create_app", "app = create_app()"]
