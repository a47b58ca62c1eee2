"""The Python client and the load generator against a real server behind a misbehaving TCP proxy: retries,
deadlines, wrapped errors, failures counted by kind; the local server launcher keeps the log of a failure."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import torch

from reprmerge_bench.loadgen import run_load, wrk_available
from reprmerge_bench.server import LocalServer
from service.client import (
    DEADLINE_MARGIN,
    MIN_RETRY_DELAY,
    AsyncClient,
    Client,
    TransportFailure,
    retry_after_seconds,
)
from tests.helpers import make_random_bundle
from tests.test_service_http import ServerProcess

TEXTS = ["a lazy dog", "seven tired wizards brew strange potions"]
PREF = {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}
REFUSED = (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Type: application/problem+json\r\n"
           b"Content-Length: 27\r\n\r\n{\"status\":429,\"title\":\"x\"}\n")


class FaultyProxy:
    """A TCP proxy in front of the server that misbehaves on purpose, one thread per connection.

    fault: "reset" (the first `count` connections are reset once a request arrives: RST, no answer),
    "hangup" (a connection is closed without an answer when its second request arrives: the
    keep-alive race), "refuse" (the first `count` requests get 429 with Retry-After: 0), "silent"
    (requests are read and never answered). `requests` holds (arrival time, first bytes) per request.
    """

    def __init__(self, upstream_port: int | None, fault: str, count: int = 1) -> None:
        self.upstream_port, self.fault, self.count = upstream_port, fault, count
        self.connections = 0
        self.requests: list[tuple[float, bytes]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, client: socket.socket, index: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port)) if self.upstream_port else None
        sel = selectors.DefaultSelector()
        for sock in (client, upstream):
            if sock is not None:
                sel.register(sock, selectors.EVENT_READ)
        answered, pending = 0, b""
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    if key.fileobj is not client:
                        client.sendall(data)
                        answered += 1
                        continue
                    pending += data
                    while (request := _take_request(pending)) is not None:
                        pending = pending[len(request):]
                        self.requests.append((time.monotonic(), request))
                        if self.fault == "reset" and index <= self.count:
                            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                            return
                        if self.fault == "hangup" and answered:
                            return
                        if self.fault == "refuse" and len(self.requests) <= self.count:
                            client.sendall(REFUSED)
                        elif upstream is not None:
                            upstream.sendall(request)
        finally:
            sel.close()
            client.close()
            if upstream is not None:
                upstream.close()


def _take_request(buffer: bytes) -> bytes | None:
    """The first complete HTTP/1.1 request (head and Content-Length body) in `buffer`, or None."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = re.search(rb"content-length:\s*(\d+)", buffer[:head_end].lower())
    end = head_end + 4 + (int(length.group(1)) if length else 0)
    return buffer[:end] if len(buffer) >= end else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("client")
    bundle = make_random_bundle(folder / "bundle", tiny_backbone_dir, torch.Generator().manual_seed(4))
    srv = ServerProcess(bundle, tmp_path_factory.mktemp("logs") / "client.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(server: ServerProcess) -> list[str]:
    with Client(server.url) as c:
        return [row["alpha"]["label"] for row in c.predict(TEXTS, PREF).model_dump()["results"][0]["predictions"]]


def _labels(response: object) -> list[str]:
    rows = response.model_dump()["results"][0]["predictions"]  # type: ignore[attr-defined]
    return [row["alpha"]["label"] for row in rows]


def test_predict_retries_a_reset_connection(server: ServerProcess, expected: list[str]) -> None:
    proxy = FaultyProxy(server.port, "reset", count=2)
    try:
        with Client(proxy.url) as c:
            assert _labels(c.predict(TEXTS, PREF)) == expected
        assert proxy.connections == 3 and len(proxy.requests) == 3
    finally:
        proxy.close()


def test_predict_retries_when_a_kept_alive_connection_hangs_up(server: ServerProcess, expected: list[str]) -> None:
    proxy = FaultyProxy(server.port, "hangup")

    async def twice() -> list[list[str]]:
        async with AsyncClient(proxy.url) as c:
            return [_labels(await c.predict(TEXTS, PREF)) for _ in range(2)]

    try:
        assert asyncio.run(twice()) == [expected, expected]
        assert proxy.connections == 2  # the second predict went out on the kept-alive one, then on a new one
    finally:
        proxy.close()


def test_transport_retries_are_bounded_and_the_error_names_the_url(server: ServerProcess) -> None:
    proxy = FaultyProxy(server.port, "reset", count=100)
    try:
        with Client(proxy.url, max_transport_retries=2) as c, pytest.raises(TransportFailure) as err:
            c.predict(TEXTS, PREF)
        assert proxy.connections == 3 and err.value.attempts == 3
        assert f"POST {proxy.url}/v1/predict" in str(err.value)
    finally:
        proxy.close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with Client(closed) as c, pytest.raises(TransportFailure, match=f"GET {closed}/v1/info: ConnectError"):
        c.info()


def test_retry_after_zero_waits_at_least_the_floor(server: ServerProcess, expected: list[str]) -> None:
    proxy = FaultyProxy(server.port, "refuse", count=2)
    try:
        with Client(proxy.url) as c:
            assert _labels(c.predict(TEXTS, PREF)) == expected
        times = [t for t, _ in proxy.requests]
        assert len(times) == 3 and min(b - a for a, b in itertools.pairwise(times)) >= MIN_RETRY_DELAY
    finally:
        proxy.close()


@pytest.mark.parametrize("value", ["0", "-3", "NaN", "inf", "soon", None, "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_retry_after_values_get_a_floor(value: str | None) -> None:
    assert MIN_RETRY_DELAY <= retry_after_seconds(value) <= 1.0


def test_retry_after_as_an_http_date() -> None:
    in_five_seconds = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=5), usegmt=True)
    assert 3 <= retry_after_seconds(in_five_seconds) <= 5


def test_refusals_are_retried_with_jitter() -> None:
    delays = set()
    client = Client("http://svc")
    for _ in range(20):
        delay = client._retry_delay(httpx.Response(429, headers={"Retry-After": "0"}), attempt=0, waited=0.0)
        assert delay is not None and MIN_RETRY_DELAY <= delay <= 1.25 * MIN_RETRY_DELAY
        delays.add(delay)
    client.close()
    assert len(delays) == 20


def test_http_timeout_follows_the_server_deadline() -> None:
    proxy = FaultyProxy(None, "silent")
    try:
        with Client(proxy.url, timeout=60) as c:
            start = time.monotonic()
            with pytest.raises(TransportFailure, match="ReadTimeout"):
                c.predict(TEXTS, PREF, timeout=0.2)
            elapsed = time.monotonic() - start
        assert 0.2 + DEADLINE_MARGIN - 0.1 <= elapsed <= 0.2 + DEADLINE_MARGIN + 2
        assert b"x-request-timeout: 0.2\r\n" in proxy.requests[0][1].lower() and len(proxy.requests) == 1
    finally:
        proxy.close()


@pytest.mark.parametrize("generator", ["python", "wrk"])
def test_load_generator_counts_failures_by_kind_and_never_raises(server: ServerProcess, generator: str) -> None:
    if generator == "wrk" and not wrk_available():
        pytest.skip("wrk is not installed")
    proxy = FaultyProxy(server.port, "reset", count=3)
    body = json.dumps({"texts": TEXTS, "preference": PREF}).encode()
    try:
        record = run_load(proxy.url, [body], 1.0, connections=2, generator=generator)
    finally:
        proxy.close()
    failures = sum(record["errors"].values())
    assert record["ok"] > 0 and failures >= 1 and 0 <= record["generator_cpu_share"] < 1
    if generator == "python":  # one error per reset connection, named
        assert record["errors"] == {"connection reset": 3} and record["sent"] == record["ok"] + 3


def test_server_log_is_kept_when_the_server_fails(tmp_path: Path) -> None:
    server = LocalServer(tmp_path / "no-bundle", None, "--device", "cpu")
    with pytest.raises(RuntimeError, match="log: ") as err:
        server.__enter__()
    assert server.log.exists() and str(server.log) in str(err.value)
    assert "cannot serve" in server.log.read_text()
