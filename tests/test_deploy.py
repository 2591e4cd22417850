"""deploy/ holds what it says: a HAProxy configuration HAProxy accepts, Kubernetes manifests that
the Kubernetes schemas accept, and a systemd template that drains within its stop timeout. (The
HAProxy configuration is run for real in test_haproxy.py; no cluster and no systemd run here.)"""

from __future__ import annotations

import configparser
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

from realtime_stt.settings import Settings

DEPLOY = ROOT / "deploy"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


@pytest.mark.skipif(HAPROXY is None, reason="needs Debian's haproxy (apt-get install haproxy; .ci/run does)")
def test_haproxy_accepts_the_configuration():
    result = subprocess.run([HAPROXY, "-c", "-f", str(DEPLOY / "haproxy.cfg")], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and "Configuration file is valid" in result.stdout, result.stdout + result.stderr


def test_kubernetes_manifests_pass_the_schemas_and_cover_the_drain():
    documents = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}
    assert set(documents) == {"Deployment", "Service"}
    # Strict: a misspelt field fails too. 1.30 is the oldest with preStop's sleep action on.
    for version in ("1.30", kubernetes_validate.latest_version()):
        for document in documents.values():
            kubernetes_validate.validate(document, version, strict=True)
    pod = documents["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health?ready=1"
    assert "livenessProbe" not in container  # /health is 503 while loading and draining
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env.get("DRAIN_SECONDS") or Settings().drain_seconds)
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert env["CPU_THREADS"] == container["resources"]["requests"]["cpu"]
    service = documents["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def test_systemd_template_runs_a_replica_per_port_and_outlasts_the_drain(tmp_path):
    text = (DEPLOY / "realtime-stt@.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(text)
    service = unit["Service"]
    assert service["ExecStart"].endswith("--host 127.0.0.1 --port %i")
    assert int(service["TimeoutStopSec"]) >= Settings().drain_seconds + 5
    assert (service["KillSignal"], service["SuccessExitStatus"]) == ("SIGTERM", "143")
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit's facts were checked, not its syntax")
    # systemd's own parser, on the unit as an instance, with a program and directory that exist here.
    instance = tmp_path / "realtime-stt@8718.service"
    instance.write_text(text.replace("/opt/stt/.venv/bin/uvicorn", "/bin/true").replace("/opt/stt", str(tmp_path)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
