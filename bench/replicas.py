"""Replicas of the server behind HAProxy, started by the benchmark: deploy/run-local.sh's recipe with
any number of them, measured whole.

    python -m bench --overhead --replicas 2 --levels 32,48,64

Each replica is a server of our own (bench/server.py) with its share of the cores (CPU_THREADS,
unless --env sets it); they start one after the other, so that each calibrates on cores the others
leave idle, as deploy/run-local.sh starts them. HAProxy runs deploy/haproxy.cfg itself, with this
run's ports and its two replicas' lines written once for each replica. The clients connect to
HAProxy; the CPU counted is the replicas' and HAProxy's, the model's is the sum of the replicas'.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.data import ROOT
from bench.server import Server, free_port, serve, spawn, stop

CONFIG = ROOT / "deploy" / "haproxy.cfg"
FRONT, STATS = "127.0.0.1:8716", "127.0.0.1:8404"  # where the shipped configuration listens
REPLICA_LINE = "    server stt"  # the shipped replicas' lines: one checked, one backup twin each


def haproxy_config(front: int, stats: int, ports: list[int]) -> str:
    """deploy/haproxy.cfg with these ports, and a checked line and a backup twin for each replica
    in place of the shipped two replicas' lines."""
    lines: list[str] = []
    for line in CONFIG.read_text().splitlines():
        if not line.startswith(REPLICA_LINE):
            lines.append(line)
        elif not any(kept.startswith(REPLICA_LINE) for kept in lines):
            lines += [f"{REPLICA_LINE}{i} 127.0.0.1:{port} check" for i, port in enumerate(ports, 1)]
            lines += [f"{REPLICA_LINE}{i}-refuse 127.0.0.1:{port} backup" for i, port in enumerate(ports, 1)]
    if not any(line.startswith(REPLICA_LINE) for line in lines):
        raise SystemExit(f"{CONFIG} no longer lists its replicas as '{REPLICA_LINE.strip()}...': bench/replicas.py must follow it")
    text = "\n".join(lines) + "\n"
    for old, new in ((FRONT, f"127.0.0.1:{front}"), (STATS, f"127.0.0.1:{stats}")):
        if old not in text:
            raise SystemExit(f"{CONFIG} no longer listens on {old}: bench/replicas.py must follow it")
        text = text.replace(old, new)
    return text


def _replicas_up(stats: int, count: int) -> bool:
    """Whether HAProxy's checks have every replica's checked line UP (its stats page, as CSV)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats}/stats;csv", timeout=2) as response:
            rows = csv.DictReader(io.StringIO(response.read().decode().removeprefix("# ")))
            up = [row for row in rows if row["pxname"] == "replicas" and not row["svname"].endswith("-refuse")
                  and row["svname"].startswith("stt") and row["status"] == "UP"]
    except OSError:
        return False
    return len(up) == count


@contextlib.contextmanager
def serve_replicas(model_id: str, env: dict[str, str], count: int, log: Path) -> Iterator[Server]:
    """``count`` replicas and HAProxy before them, all stopped on the way out; the Server is HAProxy's
    address, with the replicas in it."""
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if haproxy is None:
        raise SystemExit("--replicas runs HAProxy: install it (Debian: apt-get install haproxy)")
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(serve(model_id, env, log.with_name(f"{log.stem}-{i}.log")))
                    for i in range(1, count + 1)]
        front, stats = free_port(), free_port()
        config = log.with_name(f"{log.stem}-haproxy.cfg")
        config.write_text(haproxy_config(front, stats, [int(r.url.rsplit(":", 1)[1]) for r in replicas]))
        proxy = spawn([haproxy, "-db", "-f", str(config)], None, log.with_name(f"{log.stem}-haproxy.log"))
        stack.callback(stop, proxy)
        deadline = time.monotonic() + 30  # a check a second (the shipped "inter 1s")
        while not _replicas_up(stats, count):
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"HAProxy did not mark the {count} replicas UP in 30 s; see {config} and its log")
            time.sleep(0.2)
        yield Server(f"127.0.0.1:{front}", proxy, replicas=replicas)
