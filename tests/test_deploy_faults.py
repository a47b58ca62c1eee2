"""Faults a deployment meets, against a real `reprmerge serve` process: a damaged bundle at startup,
and a restart. (SIGTERM under load is covered in test_service_http.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.test_service_http import CLI, ServerProcess


def _flip_a_byte(bundle: Path) -> str:
    path = bundle / "statistics.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return "statistics.safetensors: sha256 mismatch"


def _truncate_manifest(bundle: Path) -> str:
    path = bundle / "manifest.json"
    path.write_text(path.read_text()[:200])
    return "manifest.json: not valid JSON"


def _drop_heads(bundle: Path) -> str:
    (bundle / "heads.safetensors").unlink()
    return "heads.safetensors: file listed in the manifest is missing"


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate_manifest, _drop_heads])
def test_a_damaged_bundle_never_turns_ready_and_says_why(
    random_bundle: Path, tmp_path: Path, damage: Callable[[Path], str]
) -> None:
    expected = damage(random_bundle)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", str(random_bundle), "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # probe /readyz for as long as the process lives
        with contextlib.suppress(httpx.TransportError):
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code != 200, (
                "a damaged bundle turned ready"
            )
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 1, out
    assert f"cannot serve {random_bundle}" in out and expected in out, out


def test_a_restarted_server_serves_the_same_answers(random_bundle: Path, tmp_path: Path) -> None:
    body = {"texts": ["a sentence to classify", "another one"], "preferences": [[1, 2, 3], [0, 0, 1]]}
    answers = []
    for run in range(2):
        server = ServerProcess(random_bundle, tmp_path / f"run{run}.log")
        try:
            response = httpx.post(f"{server.url}/v1/predict", json=body, timeout=30)
            assert response.status_code == 200, response.text
            answers.append(response.json())
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=30) == 0
        finally:
            server.stop()
    assert answers[0] == answers[1]
    log = (tmp_path / "run1.log").read_text()
    assert "ready: bundle" in log and "draining" in log
