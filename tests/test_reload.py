"""Bundle reloads against a real `reprmerge serve` process: under load, refused when damaged, by SIGHUP."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from reprmerge_core.bundle.io import HEADS_FILE
from service.app import create_app
from service.engine import Engine
from service.settings import ServiceSettings
from tests.helpers import make_random_bundle
from tests.test_service_http import ServerProcess, _bodies, _probabilities

KEY = "reload-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> tuple[Path, Path]:
    """Two bundles on one backbone, same tasks, different heads and statistics: answers differ, ids too."""
    root = tmp_path_factory.mktemp("reload")
    return (make_random_bundle(root / "a", tiny_backbone_dir, torch.Generator().manual_seed(11)),
            make_random_bundle(root / "b", tiny_backbone_dir, torch.Generator().manual_seed(12)))


@pytest.fixture(scope="module")
def current(bundles: tuple[Path, Path]) -> Path:
    """The configured bundle path: a symlink a publisher flips (SIGHUP re-reads it)."""
    link = bundles[0].parent / "current"
    link.symlink_to(bundles[0])
    return link


@pytest.fixture(scope="module")
def server(current: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(current, tmp_path_factory.mktemp("logs") / "reload.log", "--max-batch-wait", "0.005",
                        "--api-key", KEY)
    yield srv
    srv.stop()


def _bundle_id(path: Path) -> str:
    return Engine.load(path, device="cpu", trace=False).bundle_id


def _reload(c: httpx.Client, bundle: Path | None = None) -> httpx.Response:
    return c.post("/admin/reload", json={} if bundle is None else {"bundle": str(bundle)}, timeout=120)


def _served(c: httpx.Client) -> str:
    return c.get("/v1/info").json()["bundle_id"]


async def _load_during_reloads(url: str, bodies: list[dict[str, object]], targets: list[Path]
                               ) -> tuple[list[tuple[int, httpx.Response | Exception]], list[httpx.Response]]:
    """16 clients send `bodies` in turn until every reload to `targets` (in order) is done."""
    done = asyncio.Event()
    answers: list[tuple[int, httpx.Response | Exception]] = []
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=AUTH) as c:

        async def client(k: int) -> None:
            i = k
            while not done.is_set():
                try:
                    answers.append((i, await c.post("/v1/predict", json=bodies[i % len(bodies)])))
                except httpx.HTTPError as exc:
                    answers.append((i, exc))
                i += 16

        async def reloads() -> list[httpx.Response]:
            await asyncio.sleep(0.5)
            out = []
            for target in targets:
                out.append(await c.post("/admin/reload", json={"bundle": str(target)}, timeout=120))
                await asyncio.sleep(0.3)
            done.set()
            return out

        swaps = (await asyncio.gather(*(client(k) for k in range(16)), reloads()))[-1]
        assert swaps is not None
    return answers, swaps


def test_a_reload_under_load_loses_no_request_and_mixes_no_answers(server: ServerProcess,
                                                                   bundles: tuple[Path, Path]) -> None:
    a, b = bundles
    bodies = _bodies(12, seed=3)
    reference: dict[str, list[np.ndarray]] = {}
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        for target in (a, b):
            assert _reload(c, target).status_code == 200
            reference[_served(c)] = [_probabilities(c.post("/v1/predict", json=body).json()) for body in bodies]
    ids = {_bundle_id(a): a, _bundle_id(b): b}
    assert set(reference) == set(ids)
    ref_a, ref_b = (reference[i] for i in ids)
    # A mixed answer (one bundle's id, the other's heads) would be caught: the bundles' answers differ.
    assert min(np.abs(x - y).max() for x, y in zip(ref_a, ref_b, strict=True)) > 1e-2
    swapped_before = server.metric('reprmerge_bundle_reloads_total{outcome="swapped"}')

    answers, swaps = asyncio.run(_load_during_reloads(server.url, bodies, [a, b, a]))

    assert [s.status_code for s in swaps] == [200] * 3, [s.text for s in swaps]
    assert [s.json()["bundle_id"] for s in swaps] == [_bundle_id(p) for p in (a, b, a)]
    assert server.metric('reprmerge_bundle_reloads_total{outcome="swapped"}') == swapped_before + 3
    failed = [(i, r if isinstance(r, Exception) else r.text) for i, r in answers
              if isinstance(r, Exception) or r.status_code != 200]
    assert not failed, failed[:3]
    seen: dict[str, int] = {}
    for i, r in answers:
        body = r.json()  # type: ignore[union-attr]
        seen[body["bundle_id"]] = seen.get(body["bundle_id"], 0) + 1
        assert np.abs(_probabilities(body) - reference[body["bundle_id"]][i % len(bodies)]).max() <= 1e-5
    assert set(seen) == set(ids) and min(seen.values()) >= 10, seen
    # Only the current bundle is shown as served, and the replaced services were retired.
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        assert _served(c) == _bundle_id(a)
    text = httpx.get(f"{server.url}/metrics").text
    assert [line for line in text.splitlines() if line.startswith("reprmerge_build_info{")] == [
        next(line for line in text.splitlines() if line.startswith("reprmerge_build_info{") and _bundle_id(a) in line)]
    deadline = time.monotonic() + 30
    while "retired" not in server.log.read_text() or server.log.read_text().count("retired") < 3:
        assert time.monotonic() < deadline, "the replaced bundles were never retired"
        time.sleep(0.1)


def test_a_damaged_bundle_is_refused_and_the_old_one_keeps_serving(
        server: ServerProcess, bundles: tuple[Path, Path], tmp_path: Path) -> None:
    damaged = shutil.copytree(bundles[1], tmp_path / "damaged")
    heads = damaged / HEADS_FILE
    data = bytearray(heads.read_bytes())
    data[-1] ^= 0xFF
    heads.write_bytes(bytes(data))
    failed_before = server.metric('reprmerge_bundle_reloads_total{outcome="failed"}')
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        serving = _served(c)
        r = _reload(c, damaged)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["field"] == "bundle"
        assert "sha256 mismatch" in r.json()["detail"] and HEADS_FILE in r.json()["detail"]
        missing = _reload(c, tmp_path / "nowhere")
        assert missing.status_code == 422 and "does not exist" in missing.json()["detail"]
        assert _served(c) == serving
        answer = c.post("/v1/predict", json={"texts": ["still here"]})
        assert answer.status_code == 200 and answer.json()["bundle_id"] == serving
        assert httpx.post(f"{server.url}/admin/reload", json={}).status_code == 401  # no key
    assert server.metric('reprmerge_bundle_reloads_total{outcome="failed"}') == failed_before + 2
    log = server.log.read_text()
    assert f"refused {damaged}" in log and "sha256 mismatch" in log


def test_sighup_reloads_the_configured_path_and_a_second_reload_meanwhile_is_refused(
        server: ServerProcess, bundles: tuple[Path, Path], current: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        target = bundles[1] if _served(c) == _bundle_id(bundles[0]) else bundles[0]
        flip = current.parent / "current.new"
        flip.symlink_to(target)
        os.replace(flip, current)  # the publisher's atomic switch
        swapped = server.metric('reprmerge_bundle_reloads_total{outcome="swapped"}')
        started = server.log.read_text().count(f"reload: loading {current} ")
        server.process.send_signal(signal.SIGHUP)
        # Ask again as soon as the signal's reload has begun (a load takes ~0.2 s here: a fixed sleep raced it).
        deadline = time.monotonic() + 30
        while server.log.read_text().count(f"reload: loading {current} ") == started:
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.005)
        busy = _reload(c)
        assert busy.status_code == 409 and busy.json()["status"] == 409
        deadline = time.monotonic() + 60
        while server.metric('reprmerge_bundle_reloads_total{outcome="swapped"}') == swapped:
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.1)
        assert _served(c) == _bundle_id(target)
        assert c.post("/v1/predict", json={"texts": ["after the signal"]}).json()["bundle_id"] == _bundle_id(target)
    assert server.metric('reprmerge_bundle_reloads_total{outcome="busy"}') >= 1


def test_the_admin_route_is_closed_without_auth_unless_allowed(bundles: tuple[Path, Path]) -> None:
    engine = Engine.load(bundles[0], device="cpu", trace=False)
    with TestClient(create_app(ServiceSettings(bundle=bundles[0], device="cpu"), engine)) as client:
        r = client.post("/admin/reload", json={"bundle": str(bundles[1])})
        assert r.status_code == 403 and "REPRMERGE_API_KEY" in r.json()["detail"]
    open_admin = ServiceSettings(bundle=bundles[0], device="cpu", admin_without_auth=True, trace_backbone=False)
    with TestClient(create_app(open_admin, engine)) as client:
        r = client.post("/admin/reload", json={"bundle": str(bundles[1])})
        assert r.status_code == 200 and r.json()["previous_bundle_id"] == engine.bundle_id
        assert client.post("/v1/predict", json={"texts": ["x"]}).json()["bundle_id"] == r.json()["bundle_id"]
