"""The service as a real `reprmerge serve` process: concurrency, overload, SIGTERM, fuzzing, OIP clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from reprmerge_bench.server import CLI, LocalServer, metric_values
from reprmerge_core.preference import canonical_preference
from tests.helpers import make_random_bundle

WORDS = "the quick brown fox jumps over a lazy dog while seven tired wizards quietly brew strange potions".split()


class ServerProcess(LocalServer):
    """The benchmarks' `reprmerge serve` launcher on CPU, started on construction (module fixtures share one across
    tests); its log goes to a file (a full pipe would block the server). `stop` kills it: tests that need the
    drain send SIGTERM themselves."""

    def __init__(self, bundle: Path, log: Path, *flags: str) -> None:
        super().__init__(bundle, log, "--device", "cpu", *flags, ready_timeout=90)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.__enter__()

    def metric(self, name: str) -> float:
        """One series (name plus labels, as the server writes them); 0 before the server has written it."""
        return self.metrics().get(name, 0.0)

    def stop(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("http") / "bundle", tiny_backbone_dir,
                              torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(bundle, tmp_path_factory.mktemp("logs") / "main.log", "--max-batch-wait", "0.005")
    yield srv
    srv.stop()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))


def _bodies(n: int, seed: int = 0, texts: int = 3) -> list[dict[str, object]]:
    """Requests over 12 distinct preferences; every fifth asks for two preferences at once."""
    rng = random.Random(seed)
    prefs = [[round(rng.random(), 3) + 0.01 for _ in range(3)] for _ in range(12)]
    bodies: list[dict[str, object]] = []
    for i in range(n):
        body: dict[str, object] = {"texts": [_sentence(rng) for _ in range(rng.randint(1, texts))]}
        if i % 5 == 0:
            body["preferences"] = [prefs[i % 12], prefs[(i + 1) % 12]]
        else:
            body["preference"] = prefs[i % 12]
        bodies.append(body)
    return bodies


def _probabilities(body: dict) -> np.ndarray:
    return np.array([[p for task in row.values() for p in task["probabilities"].values()]
                     for result in body["results"] for row in result["predictions"]])


async def _fire(url: str, bodies: Sequence[Mapping[str, object]], timeout: float = 60) -> list[httpx.Response]:
    """POST every body at once; every one must get an answer (the first failures are the assertion message)."""
    limits = httpx.Limits(max_connections=len(bodies) + 10, max_keepalive_connections=len(bodies) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        results = await asyncio.gather(*(c.post("/v1/predict", json=b) for b in bodies), return_exceptions=True)
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert len(answered) == len(results), [r for r in results if isinstance(r, BaseException)][:3]
    return answered


def test_concurrent_mixed_preferences_equal_their_solo_answers(server: ServerProcess) -> None:
    bodies = _bodies(100)
    batches_before = server.metric("reprmerge_batch_size_count")
    together = asyncio.run(_fire(server.url, bodies))
    batches = server.metric("reprmerge_batch_size_count") - batches_before
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200][:3]
    assert batches < 100, "requests were never batched together"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body, mixed in zip(bodies, together, strict=True):
            solo = c.post("/v1/predict", json=body).json()
            assert [r["fingerprint"] for r in solo["results"]] == [r["fingerprint"] for r in mixed.json()["results"]]
            assert np.abs(_probabilities(solo) - _probabilities(mixed.json())).max() <= 1e-5
    # Mixed batches really mixed heads.
    one_head = server.metric('reprmerge_batch_distinct_heads_bucket{le="1.0"}')
    assert one_head < server.metric("reprmerge_batch_distinct_heads_count")


def test_overload_gets_429_quickly_and_recovers(bundle: Path, tmp_path: Path) -> None:
    srv = ServerProcess(bundle, tmp_path / "overload.log", "--queue-limit", "2", "--max-batch-size", "4")
    try:
        start = time.monotonic()
        responses = asyncio.run(_fire(srv.url, _bodies(150, seed=1, texts=16), timeout=20))
        elapsed = time.monotonic() - start
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["status"] == 429 and elapsed < 20
        assert httpx.post(f"{srv.url}/v1/predict", json={"texts": ["calm again"]}).status_code == 200
        assert srv.metric('reprmerge_rejections_total{reason="queue_full"}') == codes.count(429)
    finally:
        srv.stop()


def test_a_failing_solve_fails_only_its_requests_and_the_server_keeps_serving(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raising solve used to fail its whole batch (a short one hung the batch worker for good)."""
    bad = [0.1, 0.2, 0.7]
    monkeypatch.setenv("REPRMERGE_FAIL_SOLVE_FINGERPRINT",
                       canonical_preference(bad, ("alpha", "beta", "gamma")).fingerprint)
    srv = ServerProcess(bundle, tmp_path / "fault.log", "--max-batch-wait", "0.05")
    try:
        bodies = _bodies(60, seed=3)
        for body in bodies[::4]:
            body.pop("preferences", None)
            body["preference"] = bad
        responses = asyncio.run(_fire(srv.url, bodies, timeout=30))
        for i, r in enumerate(responses):
            assert r.status_code == (500 if i % 4 == 0 else 200), r.text
        failed = responses[0].json()
        assert responses[0].headers["content-type"] == "application/problem+json" and failed["status"] == 500
        assert httpx.post(f"{srv.url}/v1/predict",
                          json={"texts": ["after the failure"], "preference": [1, 2, 3]}).status_code == 200
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    finally:
        srv.stop()
    assert "injected solve failure" in (tmp_path / "fault.log").read_text()


def test_sigterm_under_load_answers_every_accepted_request(bundle: Path, tmp_path: Path) -> None:
    srv = ServerProcess(bundle, tmp_path / "sigterm.log", "--max-batch-size", "16", "--queue-limit", "1000")

    async def scenario() -> tuple[list[httpx.Response], int, int]:
        load = asyncio.ensure_future(_fire(srv.url, _bodies(150, seed=2, texts=16)))
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
            give_up = time.monotonic() + 60
            while True:  # wait until work is queued, then signal
                assert time.monotonic() < give_up, "no queue formed within 60 s"
                depth = metric_values((await c.get("/metrics")).text)["reprmerge_queue_depth"]
                if depth >= 20:
                    break
                await asyncio.sleep(0.01)
            srv.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            ready = (await c.get("/readyz")).status_code
            late = (await c.post("/v1/predict", json={"texts": ["too late"]})).status_code
        return await load, ready, late

    try:
        responses, ready, late = asyncio.run(scenario())
        assert ready == 503 and late == 503
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(200) >= 20
        assert srv.process.wait(timeout=30) == 0
    finally:
        srv.stop()
    log = (tmp_path / "sigterm.log").read_text()
    assert "draining" in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert {"request_id", "route", "status", "duration_ms"} <= lines[0].keys()


def test_unmodified_triton_client_gets_correct_answers(server: ServerProcess) -> None:
    import tritonclient.http as triton

    texts, pref = ["a lazy dog", "seven tired wizards brew"], {"alpha": 0.2, "gamma": 0.8}
    want = httpx.post(f"{server.url}/v1/predict", json={"texts": texts, "preference": pref}).json()["results"][0]
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("reprmerge")
    meta = client.get_model_metadata("reprmerge")
    assert meta["inputs"][0]["name"] == "text" and {o["name"] for o in meta["outputs"]} >= {"alpha_label",
                                                                                            "beta_probabilities"}
    for binary in (True, False):
        inp = triton.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
        result = client.infer("reprmerge", [inp], parameters={"preference": json.dumps(pref)})
        assert result.get_response()["parameters"]["preference_fingerprint"] == want["fingerprint"]
        for task in ("alpha", "beta", "gamma"):
            expected = np.array([list(row[task]["probabilities"].values()) for row in want["predictions"]])
            assert np.abs(result.as_numpy(f"{task}_probabilities") - expected).max() <= 1e-5
            labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy(f"{task}_label")]
            assert labels == [row[task]["label"] for row in want["predictions"]]
    with pytest.raises(Exception, match="unknown model"):
        client.infer("other", [inp])
    client.close()


def test_triton_client_versions_config_compression_and_timeout(server: ServerProcess) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_model_ready("reprmerge", "1") and not client.is_model_ready("reprmerge", "99")
    assert client.get_model_metadata("reprmerge", "1")["name"] == "reprmerge"
    assert client.get_model_config("reprmerge")["input"][0]["name"] == "text"
    inp = triton.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array(["a lazy dog", "seven tired wizards"], dtype=object))
    plain = client.infer("reprmerge", [inp]).as_numpy("alpha_probabilities")
    for algorithm in ("gzip", "deflate"):
        packed = client.infer("reprmerge", [inp], request_compression_algorithm=algorithm)
        assert np.array_equal(packed.as_numpy("alpha_probabilities"), plain)
        assert "id" not in packed.get_response()
    with pytest.raises(InferenceServerException, match=r"[Dd]eadline|504"):
        client.infer("reprmerge", [inp], timeout=1)  # microseconds
    with pytest.raises(InferenceServerException):
        client.infer("reprmerge", [inp], model_version="99")
    client.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzzing_the_openapi_schema_finds_no_server_error(server: ServerProcess, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) >= 10, [result for result in results if not isinstance(result, Ok)]

    def check(case: schemathesis.Case) -> None:
        response = case.call(timeout=30)
        # 504 is the documented answer to a client deadline that passed: the fuzzer sets that header.
        client_deadline = response.status_code == 504 and "X-Request-Timeout" in (case.headers or {})
        assert response.status_code < 500 or client_deadline, f"{case.method} {case.path}: {response.text}"
        if response.status_code >= 400:
            assert response.headers["content-type"] == ["application/problem+json"]

    for operation in operations:
        strategy = operation.as_strategy(generation_mode=mode)
        fuzz = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                        database=None)
        try:
            fuzz(given(case=strategy)(check))()
        except Unsatisfiable:  # an operation without inputs has no invalid cases to generate
            assert mode is GenerationMode.NEGATIVE



def test_a_lone_surrogate_fails_only_its_own_request(server: ServerProcess) -> None:
    """Raw bytes ED A0 80 (Python's JSON decoder accepts them) among 40 co-batched requests: one 422, 40 answers."""
    poison = b'{"texts": ["fine", "\xed\xa0\x80"]}'

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=50)) as c:
            good = [c.post("/v1/predict", json=b) for b in _bodies(40, seed=5)]
            bad = c.post("/v1/predict", content=poison, headers={"Content-Type": "application/json"})
            return await asyncio.gather(bad, *good)

    bad, *good = asyncio.run(scenario())
    assert bad.status_code == 422 and bad.json()["field"] == "texts[1]", bad.text
    assert [r.status_code for r in good] == [200] * 40


def _http(sock: socket.socket, request: bytes, timeout: float = 10) -> bytes:
    """Send one raw request and read one response (headers and Content-Length body); b"" if the server closed."""
    sock.settimeout(timeout)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_an_idle_connection_outlives_the_clients_pool_expiry(server: ServerProcess) -> None:
    """httpx expires pooled connections after 5 s idle; the server must keep them longer, or a reuse at ~5 s dies."""
    get = f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert _http(sock, get).startswith(b"HTTP/1.1 200")
        time.sleep(5.5)
        assert _http(sock, get).startswith(b"HTTP/1.1 200")


@pytest.fixture
def strict_server(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server with 1 s header and body deadlines and room for 20 connections."""
    for name, value in (("HEADER_TIMEOUT", "1"), ("BODY_TIMEOUT", "1"), ("MAX_CONNECTIONS", "20")):
        monkeypatch.setenv(f"REPRMERGE_{name}", value)
    srv = ServerProcess(bundle, tmp_path / "strict.log")
    yield srv
    srv.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the connection within `seconds`; None if it stayed open."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def test_slow_clients_are_cut_off_and_cannot_exhaust_connections(strict_server: ServerProcess) -> None:
    srv, address = strict_server, ("127.0.0.1", strict_server.port)
    with socket.create_connection(address) as silent, socket.create_connection(address) as dribbling, \
            socket.create_connection(address) as slow_body:
        dribbling.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        slow_body.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"texts\": ")
        assert _closed_within(silent, 3) == b""
        assert _closed_within(dribbling, 3) == b""
        answer = _closed_within(slow_body, 3)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower()
    # Past the connection cap: answered 503 and closed at once, and the server keeps serving afterwards.
    crowd = [socket.create_connection(address) for _ in range(40)]
    try:
        refused = [_closed_within(s, 0.5) for s in crowd]
        assert sum(r is not None and r.startswith(b"HTTP/1.1 503") for r in refused) >= 20
    finally:
        for s in crowd:
            s.close()
    time.sleep(1.5)
    assert httpx.post(f"{srv.url}/v1/predict", json={"texts": ["still serving"]}).status_code == 200
    assert srv.log.read_text().count("refusing connections") <= 2


def test_a_body_cut_short_by_a_disconnect_is_not_answered(server: ServerProcess) -> None:
    """16 of 200 declared bytes, valid JSON on their own, then the client leaves: the model must not run."""
    ok = 'reprmerge_requests_total{code="200",route="/v1/predict"}'
    answered, batches = server.metric(ok), server.metric("reprmerge_batch_size_count")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"texts\": [\"a\"]}")
        time.sleep(0.2)
    time.sleep(1)
    assert server.metric(ok) == answered and server.metric("reprmerge_batch_size_count") == batches
    assert server.metric('reprmerge_rejections_total{reason="client_gone"}') >= 1


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("REPRMERGE_API_KEY", "", "API key is empty"),
    ("REPRMERGE_API_KEY", "  ", "API key is empty"),
    ("REPRMERGE_API_KEYS", "s3cret", "unknown environment variable(s) REPRMERGE_API_KEYS"),
])
def test_a_misconfigured_key_refuses_to_start_instead_of_serving_without_auth(
    bundle: Path, variable: str, value: str, message: str,
) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", variable: value}
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", str(bundle), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 2 and message in out, out


def test_the_startup_log_says_whether_auth_is_on(server: ServerProcess) -> None:
    assert "auth off" in server.log.read_text()


def _finished_after(srv: ServerProcess, since: float, limit: float = 60) -> float:
    """Seconds from `since` until uvicorn logs that it finished (interpreter teardown after that is not counted)."""
    while "Finished server process" not in srv.log.read_text():
        assert time.monotonic() - since < limit, srv.log.read_text()
        time.sleep(0.02)
    return time.monotonic() - since


def test_an_idle_server_answers_503_with_connection_close_for_the_drain_grace(bundle: Path, tmp_path: Path) -> None:
    srv = ServerProcess(bundle, tmp_path / "grace.log")
    try:
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            srv.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)  # an idle server used to close its listener ~40 ms after the signal
            ready = c.get("/readyz")
            late = c.post("/v1/predict", json={"texts": ["too late"]})
        assert ready.status_code == 503 and ready.headers["connection"] == "close"
        assert late.status_code == 503 and late.headers["connection"] == "close"
        assert 3.0 <= _finished_after(srv, signalled) < 4.5  # the default drain_grace of 3 s, then a prompt exit
        assert srv.process.wait(timeout=60) == 0
    finally:
        srv.stop()


def test_shutdown_under_load_is_bounded_by_the_drain_timeout(
    minilm_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Far more queued work than 2 s can answer: the server finishes 2 s (+ a small constant) after SIGTERM."""
    monkeypatch.setenv("REPRMERGE_DRAIN_TIMEOUT", "2")
    # Deadlines far away, so admission (estimated wait vs deadline) takes all of it even on a slow CPU.
    monkeypatch.setenv("REPRMERGE_DEFAULT_TIMEOUT", "600")
    # The real MiniLM backbone: 100 batches of 32 texts are several seconds of work on any CPU.
    srv = ServerProcess(minilm_bundle, tmp_path / "bounded.log", "--max-batch-size", "32", "--queue-limit", "1000")

    async def scenario() -> float:
        full_batches = [{"texts": [" ".join(WORDS * 2)] * 32} for _ in range(150)]
        load = asyncio.ensure_future(_fire(srv.url, full_batches))
        deadline = time.monotonic() + 60
        while srv.metric("reprmerge_queue_depth") < 100:
            assert time.monotonic() < deadline, "the queue never filled"
            await asyncio.sleep(0.05)
        srv.process.send_signal(signal.SIGTERM)
        elapsed = await asyncio.get_running_loop().run_in_executor(None, _finished_after, srv, time.monotonic())
        await asyncio.gather(load, return_exceptions=True)
        return elapsed

    try:
        elapsed = asyncio.run(scenario())
        assert "drain timed out" in srv.log.read_text()
        assert elapsed < 2 + 1.5, f"shutdown took {elapsed:.1f} s with drain_timeout 2 s"
    finally:
        srv.stop()
