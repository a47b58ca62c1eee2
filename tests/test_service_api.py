"""The service in-process (TestClient runs the lifespan): contract of every error, cache, client retries."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from reprmerge_core.preference import Preference, canonical_preference
from service.app import create_app, field_of
from service.client import AsyncClient, Client, ProblemError
from service.engine import Engine, Head
from service.errors import ServiceError
from service.head_cache import SolveCache
from service.metrics import Metrics
from service.settings import ServiceSettings
from tests.helpers import make_random_bundle

TASKS = ("alpha", "beta", "gamma")
KEY = "s3cret"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Engine:
    bundle = make_random_bundle(tmp_path_factory.mktemp("svc") / "bundle", tiny_backbone_dir, torch.Generator().manual_seed(1))
    return Engine.load(bundle, device="cpu")


def _client(engine: Engine, **overrides: object) -> TestClient:
    limits: dict[str, object] = {"max_inputs": 4, "max_text_chars": 50, "max_body_bytes": 4096, "max_preferences": 3}
    settings = ServiceSettings(bundle=engine.bundle.path, device="cpu", **{**limits, **overrides})  # type: ignore[arg-type]
    return TestClient(create_app(settings, engine), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with _client(engine, api_key=KEY) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


OK = {"texts": ["a fine day"], "preference": {"alpha": 1}}
BAD_INPUTS = [
    # (name, body (dict -> JSON, str -> raw), extra headers, status, field)
    ("bad json", '{"texts": [', {}, 400, None),
    ("not an object", "[1, 2]", {}, 422, "body"),
    ("texts wrong type", {"texts": "hello"}, {}, 422, "texts"),
    ("text not a string", {"texts": [1]}, {}, 422, "texts[0]"),
    ("weight as string", {"texts": ["a"], "preference": {"alpha": "1"}}, {}, 422, "preference.alpha"),
    ("NaN weight", '{"texts": ["a"], "preference": {"alpha": NaN}}', {}, 422, "preference.alpha"),
    ("negative weight", {"texts": ["a"], "preference": [1, -0.5, 0]}, {}, 422, "preference[1]"),
    ("integer weight beyond float", '{"texts": ["a"], "preference": {"beta": 1%s}}' % ("0" * 400), {}, 422, "preference.beta"),
    ("all-zero preference", {"texts": ["a"], "preference": [0, 0, 0]}, {}, 422, "preference"),
    ("wrong length", {"texts": ["a"], "preference": [1, 2]}, {}, 422, "preference"),
    ("unknown task in preference", {"texts": ["a"], "preference": {"zeta": 1}}, {}, 422, "preference.zeta"),
    ("unknown task asked", {"texts": ["a"], "tasks": ["zeta"]}, {}, 422, "tasks[0]"),
    ("both preference forms", {**OK, "preferences": [[1, 1, 1]]}, {}, 422, "preferences"),
    ("bad preference in list", {"texts": ["a"], "preferences": [[1, 1, 1], {"alpha": -1}]}, {}, 422, "preferences[1].alpha"),
    ("unknown field", {**OK, "colour": "red"}, {}, 422, "colour"),
    ("empty texts", {"texts": []}, {}, 422, "texts"),
    ("bad timeout header", OK, {"X-Request-Timeout": "soon"}, 422, "header.X-Request-Timeout"),
    ("too many inputs", {"texts": ["a"] * 5}, {}, 413, "texts"),
    ("too many preferences", {"texts": ["a"], "preferences": [[1, 1, 1]] * 4}, {}, 413, None),
    ("text too long", {"texts": ["x" * 51]}, {}, 413, "texts[0]"),
    ("body too large", {"texts": ["a"], "pad": "x" * 5000}, {}, 413, None),
    ("lone surrogate in a text", {"texts": ["fine", "\ud800"]}, {}, 422, "texts[1]"),
    ("raw surrogate bytes in a text", b'{"texts": ["\xed\xa0\x80"]}', {}, 422, "texts[0]"),
    ("surrogate in a preference key", {"texts": ["a"], "preference": {"\ud800": 1}}, {}, 422, "preference.\\ud800"),
    ("list element not a number", {"texts": ["a"], "preference": [1, "x", 0]}, {}, 422, "preference[1]"),
    ("list element not a number in preferences", {"texts": ["a"], "preferences": [[1, 1, 1], [1, None, 0]]}, {}, 422,
     "preferences[1][1]"),
    ("wrong key", OK, {"Authorization": "Bearer nope"}, 401, None),
    ("deadline passed", OK, {"X-Request-Timeout": "1e-9"}, 504, None),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_get_their_documented_problem(client: TestClient, name: str, body: object, headers: dict[str, str],
                                                 status: int, field: str | None) -> None:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = client.post("/v1/predict", content=content, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert {"type", "title", "status", "detail", "request_id"} <= problem.keys()
    assert problem["status"] == status and problem["request_id"] == r.headers["x-request-id"]
    assert problem.get("field") == field
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_truncate_cuts_texts_over_the_limit_instead_of_refusing_them(roomy: TestClient) -> None:
    """As text-embeddings-inference's `truncate`: without it 413 names the text and the field that would cut it;
    with it (/v1 field, /v2 parameter) the text is answered as its first `max_text_chars` (50 here) characters."""
    long = "the quick brown fox jumps over the lazy dog and on " * 4  # 204 characters
    refused = roomy.post("/v1/predict", json={"texts": ["short", long]})
    assert refused.status_code == 413 and refused.json()["field"] == "texts[1]"
    assert "204 characters, at most 50; set `truncate` to true" in refused.json()["detail"]
    v2_refused = roomy.post("/v2/models/reprmerge/infer", json=_v2(["short", long]))
    assert v2_refused.status_code == 413 and v2_refused.json()["field"] == "inputs[0].data[1]"
    assert "set `parameters.truncate` to true" in v2_refused.json()["detail"]

    def v1(body: dict[str, object]) -> list[list[float]]:
        r = roomy.post("/v1/predict", json={"preference": [1, 2, 3], **body})
        assert r.status_code == 200, r.text
        return [list(p["beta"]["probabilities"].values()) for p in r.json()["results"][0]["predictions"]]

    cut = v1({"texts": ["short", long[:50]]})
    assert v1({"texts": ["short", long], "truncate": True}) == cut
    assert cut[1] != v1({"texts": [long[:40]]})[0]  # the cut length matters: the test can tell
    r = roomy.post("/v2/models/reprmerge/infer", json=_v2(["short", long], parameters={"truncate": True,
                                                                                     "preference": "[1, 2, 3]"}))
    assert r.status_code == 200, r.text
    beta = next(o for o in r.json()["outputs"] if o["name"] == "beta_probabilities")
    np.testing.assert_allclose(np.array(beta["data"]).reshape(2, 3), np.array(cut), rtol=1e-6, atol=1e-7)
    bad = roomy.post("/v2/models/reprmerge/infer", json=_v2([long], parameters={"truncate": "yes"}))
    assert bad.status_code == 422 and bad.json()["field"] == "parameters.truncate"


def _v2(data: object = ("a fine day",), **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "text", "shape": [len(data)], "datatype": "BYTES", "data": list(data)}], **extra}  # type: ignore[arg-type]


def _binary(texts: Sequence[str], size: object) -> tuple[bytes, dict[str, str]]:
    """A Triton binary-extension body: JSON header, then 4-byte-length-prefixed BYTES elements."""
    blob = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)
    head = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": size}}]}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


DEEP = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
V2_BAD_INPUTS = [
    # (name, body (dict -> JSON, bytes -> raw), extra headers, status, field)
    ("lone surrogate in a text", _v2(["ok", "\ud800"]), {}, 422, "inputs[0].data[1]"),
    ("raw surrogate bytes in a text", _v2(["\udead"]), {}, 422, "inputs[0].data[0]"),
    ("surrogate in the id", _v2(id="\ud800"), {}, 422, "id"),
    ("surrogate in a preference key", _v2(parameters={"preference": {"\ud800": 1}}), {}, 422, "parameters.preference.\\ud800"),
    ("400-digit weight", _v2(parameters={"preference": '{"alpha": 1' + "0" * 400 + "}"}), {}, 422, "parameters.preference.alpha"),
    ("400-digit weight in a list", _v2(parameters={"preference": [1, 10**400, 1]}), {}, 422, "parameters.preference[1]"),
    ("binary_data_size a string", _binary(["a"], "abc"), None, 422, "inputs[0].parameters.binary_data_size"),
    ("binary_data_size a list", _binary(["a"], [1]), None, 422, "inputs[0].parameters.binary_data_size"),
    ("binary_data_size NaN", _binary(["a"], float("nan")), None, 422, "inputs[0].parameters.binary_data_size"),
    ("binary_data_size past the blob", _binary(["a"], 50), None, 400, "inputs[0].parameters.binary_data_size"),
    ("100,000-deep JSON", DEEP, {}, 400, None),
    ("5,000-digit integer", b'{"inputs": [], "id": ' + b"9" * 5000 + b"}", {}, 400, None),
    ("shape not integers", _v2(["a"]) | {"inputs": [{"name": "text", "shape": ["x"], "datatype": "BYTES", "data": ["a"]}]},
     {}, 422, "inputs[0].shape[0]"),
]


@pytest.fixture(scope="module")
def roomy(engine: Engine) -> Iterator[TestClient]:
    """Without a key and with a 1 MiB body limit, for the bodies that attack the parser."""
    with _client(engine, max_body_bytes=1 << 20) as c:
        yield c


@pytest.mark.parametrize(("name", "body", "headers", "status", "field"), V2_BAD_INPUTS, ids=[b[0] for b in V2_BAD_INPUTS])
def test_v2_bad_inputs_get_their_documented_problem(roomy: TestClient, name: str, body: object,
                                                    headers: dict[str, str] | None, status: int, field: str | None) -> None:
    if isinstance(body, tuple):
        body, headers = body
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if name.startswith("raw surrogate"):
        content = content.replace(b"\\udead", b"\xed\xba\xad")
    r = roomy.post("/v2/models/reprmerge/infer", content=content, headers={"Content-Type": "application/json", **(headers or {})})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status and problem.get("field") == field and problem["error"] == problem["detail"]


def test_v2_versions_config_and_ids(roomy: TestClient, engine: Engine) -> None:
    assert roomy.get("/v2/models/reprmerge/versions/1").json()["name"] == "reprmerge"
    assert roomy.get("/v2/models/reprmerge/versions/1/ready").json()["ready"] is True
    for path in ("/v2/models/reprmerge/versions/99", "/v2/models/reprmerge/versions/99/ready",
                 "/v2/models/reprmerge/versions/99/config"):
        assert roomy.get(path).status_code == 404, path
    assert roomy.post("/v2/models/reprmerge/versions/99/infer", json=_v2()).status_code == 404
    config = roomy.get("/v2/models/reprmerge/config").json()
    assert config == roomy.get("/v2/models/reprmerge/versions/1/config").json()
    assert config["name"] == "reprmerge" and config["max_batch_size"] == 0
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert {o["name"]: o["dims"] for o in config["output"]}["beta_probabilities"] == [-1, len(engine.labels["beta"])]
    assert "id" not in roomy.post("/v2/models/reprmerge/infer", json=_v2()).json()
    assert roomy.post("/v2/models/reprmerge/versions/1/infer", json=_v2(id="r1")).json()["id"] == "r1"


def test_v2_timeout_parameter_is_the_deadline(roomy: TestClient) -> None:
    assert roomy.post("/v2/models/reprmerge/infer", json=_v2(parameters={"timeout": 1})).status_code == 504  # 1 us
    assert roomy.post("/v2/models/reprmerge/infer", json=_v2(parameters={"timeout": 10**400})).status_code == 200
    bad = roomy.post("/v2/models/reprmerge/infer", json=_v2(parameters={"timeout": "soon"}))
    assert bad.status_code == 422 and bad.json()["field"] == "parameters.timeout"


def test_compressed_bodies_are_read_within_the_body_limit(roomy: TestClient) -> None:
    import gzip
    import zlib

    raw = json.dumps(_v2(["a fine day", "a dreadful night"], parameters={"preference": '{"alpha": 1}'})).encode()
    plain = roomy.post("/v2/models/reprmerge/infer", content=raw, headers={"Content-Type": "application/json"}).json()
    for encoding, packed in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        r = roomy.post("/v2/models/reprmerge/infer", content=packed,
                       headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        assert r.status_code == 200 and r.json()["outputs"] == plain["outputs"], r.text
    v1 = roomy.post("/v1/predict", content=gzip.compress(json.dumps(OK).encode()),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert v1.status_code == 200
    bomb = gzip.compress(b" " * (2 << 20) + b"{}")  # 2 MiB of spaces in 2 KB
    cases = [(bomb, "gzip", 413), (b"not gzip at all", "gzip", 400), (gzip.compress(raw)[:-12], "gzip", 400),
             (raw, "br", 415)]
    for content, encoding, status in cases:
        r = roomy.post("/v2/models/reprmerge/infer", content=content,
                       headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json", (encoding, r.text)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_wrong_content_type_is_415(roomy: TestClient, content_type: str) -> None:
    for path in ("/v1/predict", "/v2/models/reprmerge/infer"):
        r = roomy.post(path, content=json.dumps(OK), headers={"Content-Type": content_type})
        assert r.status_code == 415 and r.json()["status"] == 415, (path, r.text)
    assert roomy.post("/v1/nowhere", content="x", headers={"Content-Type": content_type}).status_code == 404


def test_http_details(roomy: TestClient) -> None:
    """405 names the allowed methods; slash redirects stay on the server; a huge echoed name is clipped once."""
    r = roomy.get("/v1/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["status"] == 405
    r = roomy.get("/v1/info/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code in (307, 308) and r.headers["location"] == "/v1/info"
    key = "k" * 100_000
    for body in ({"texts": ["a"], "preference": {key: 1}}, {"texts": ["a"], "tasks": [key]}):
        r = roomy.post("/v1/predict", json=body)
        assert r.status_code == 422 and len(r.content) < 3000, len(r.content)


def test_refusals_are_counted_under_their_route(client: TestClient) -> None:
    assert client.post("/v1/predict", json=OK, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v2/models/reprmerge/infer", json=_v2(), headers={"Authorization": ""}).status_code == 401
    text = client.get("/metrics").text
    assert 'reprmerge_requests_total{code="401",route="/v1/predict"}' in text
    assert 'reprmerge_requests_total{code="401",route="/v2/models/{name}/infer"}' in text


def test_openapi_documents_the_configured_limits(client: TestClient) -> None:
    bodies = client.get("/openapi.json").json()["components"]["schemas"]
    texts = bodies["PredictRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 4 and texts["items"]["maxLength"] == 50  # the settings of `_client`
    for name in ("PredictRequest", "TradeoffRequest"):
        prefs = bodies[name]["properties"]["preferences"]["anyOf"][0]
        assert prefs["maxItems"] == 3 and bodies[name]["not"]["required"] == ["preference", "preferences"]


def test_a_bad_text_never_reaches_the_model(engine: Engine) -> None:
    """The surrogate is refused at validation: no batch (and so no co-batched request) ever sees it."""
    with _client(engine) as c:
        batches = c.app.state.service.metrics.batch_size._sum.get()  # type: ignore[union-attr]
        for body in ({"texts": ["\ud800"]}, _v2(["\ud800"])):
            path = "/v1/predict" if "texts" in body else "/v2/models/reprmerge/infer"
            assert c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}).status_code == 422
        assert c.app.state.service.metrics.batch_size._sum.get() == batches  # type: ignore[union-attr]


def test_probes_and_metrics_need_no_key_but_the_api_does(client: TestClient) -> None:
    bare = {"Authorization": ""}
    assert client.get("/livez", headers=bare).status_code == 200
    assert client.get("/readyz", headers=bare).json() == {"status": "ready"}
    assert client.get("/v2/health/ready", headers=bare).status_code == 200
    assert client.get("/v1/info", headers=bare).status_code == 401
    text = client.get("/metrics", headers=bare).text
    for name in ("reprmerge_requests_total", "reprmerge_head_cache_hits_total", "reprmerge_rejections_total",
                 "reprmerge_batch_distinct_heads_bucket", "reprmerge_build_info", "reprmerge_queue_depth"):
        assert name in text
    assert "fingerprint" not in text


def test_predict_answers_every_preference_and_task_with_provenance(client: TestClient, engine: Engine) -> None:
    r = client.post("/v1/predict", json={"texts": ["one", "two"], "preferences": [[2, 0, 0], {"gamma": 1}], "tasks": ["beta"]})
    assert r.status_code == 200 and "queue;dur=" in r.headers["server-timing"]
    body = r.json()
    assert body["bundle_id"] == engine.bundle_id
    first, second = body["results"]
    assert first["preference"] == {"alpha": 1.0, "beta": 0.0, "gamma": 0.0}
    assert first["fingerprint"] == canonical_preference([1, 0, 0], TASKS).fingerprint
    assert second["fingerprint"] == canonical_preference({"gamma": 5}, TASKS).fingerprint
    for result in body["results"]:
        assert len(result["predictions"]) == 2
        for pred in result["predictions"]:
            assert set(pred) == {"beta"}
            probs = pred["beta"]["probabilities"]
            assert abs(sum(probs.values()) - 1) < 1e-5 and pred["beta"]["label"] == max(probs, key=probs.get)


def test_predict_matches_the_library_computation(client: TestClient, engine: Engine) -> None:
    """Reference: backbone -> W_p (explicit, from the solver) -> original heads -> softmax."""
    texts, pref = ["the service", "must agree"], [0.2, 0.3, 0.5]
    got = client.post("/v1/predict", json={"texts": texts, "preference": pref}).json()["results"][0]["predictions"]
    z = engine.backbone.encode(texts).double()
    W = engine.folder.solver.solve(torch.tensor([pref], dtype=torch.float64))[0]
    for t, head in enumerate(engine.bundle.heads):
        logits = (z @ W.T) @ head.weight.double().T + head.bias.double()
        want = logits.softmax(-1)
        have = torch.tensor([list(p[TASKS[t]]["probabilities"].values()) for p in got], dtype=torch.float64)
        assert torch.allclose(have, want, atol=1e-5)


def reference_quality_kept(engine: Engine, prefs: list[list[float]]) -> np.ndarray:
    """NumPy float64 from the bundle's raw statistics: energy normalisation, the recorded prior (identity weight a:
    a I + (1 - a) Procrustes), explicit W_p, the literal loss tr(W A W^T) - 2 tr(W B^T) + e + beta ||W - O||^2, then
    the documented clipped ratio."""
    correction = engine.bundle.manifest.correction
    beta, a, terms = correction.beta, correction.identity_weight, []
    for st in engine.bundle.statistics:
        A, B = st.A.numpy(), st.B.numpy()
        d = A.shape[0]
        scale = np.trace(A) / d
        A, B, e = A / scale, B / scale, st.e / scale
        U, _, Vt = np.linalg.svd(B + 1e-6 * np.linalg.norm(B, "nuc") / d * np.eye(d))
        terms.append((A, B, e, a * np.eye(d) + (1 - a) * U @ Vt))

    def losses(W: np.ndarray) -> np.ndarray:
        return np.array([np.trace(W @ A @ W.T) - 2 * np.trace(W @ B.T) + e + beta * np.sum((W - O) ** 2)
                         for A, B, e, O in terms])

    def solve(p: np.ndarray) -> np.ndarray:
        d = terms[0][0].shape[0]
        M = sum(w * (B + beta * O) for w, (_, B, _, O) in zip(p, terms))
        return M @ np.linalg.inv(sum(w * (A + beta * np.eye(d)) for w, (A, _, _, _) in zip(p, terms)))

    n = len(terms)
    best = np.array([losses(solve(np.eye(n)[t]))[t] for t in range(n)])
    uncorrected = losses(np.eye(terms[0][0].shape[0]))
    return np.array([np.clip((uncorrected - losses(solve(np.array(p)))) / (uncorrected - best), 0, 1) for p in prefs])


def test_quality_kept_in_every_answer_matches_an_independent_float64_computation(client: TestClient, engine: Engine) -> None:
    prefs = [[1, 0, 0], [0, 1, 1], [1, 1, 1], [0.2, 0.3, 0.5]]
    want = reference_quality_kept(engine, prefs)
    assert np.diag(want[:1]).tolist() == [1.0] and want[1, 0] < 0.5  # one-hot keeps all; weight 0 loses most
    for i, p in enumerate(prefs):  # one preference per request: the client allows 3 at most
        got = client.post("/v1/predict", json={"texts": ["a day"], "preference": p, "quality_kept": True}).json()["results"][0]["quality_kept"]
        assert list(got) == list(TASKS)
        np.testing.assert_allclose(list(got.values()), want[i], rtol=0, atol=5.1e-5)  # reported to 4 decimals
        row = client.post("/v1/tradeoff", json={"preference": p}).json()["results"][0]["tasks"]
        np.testing.assert_allclose([row[t]["quality_kept"] for t in TASKS], want[i], rtol=0, atol=5.1e-5)
        for t in TASKS:
            assert row[t]["best"] <= row[t]["loss"] + 1e-9 and row[t]["best"] < row[t]["uncorrected"]
        v2 = client.post("/v2/models/reprmerge/infer", json={
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a day"]}],
            "parameters": {"preference": json.dumps(p), "tasks": "gamma,alpha", "quality_kept": True}}).json()
        assert json.loads(v2["parameters"]["quality_kept"]) == pytest.approx({"gamma": want[i, 2], "alpha": want[i, 0]},
                                                                            rel=0, abs=5.1e-5)
    # only the tasks asked for, and the marker is documented in the schema
    subset = client.post("/v1/predict", json={"texts": ["a"], "preference": {"beta": 1}, "tasks": ["beta"],
                                              "quality_kept": True}).json()
    assert subset["results"][0]["quality_kept"] == {"beta": 1.0}
    # not asked: not computed (a new preference would pay a trade-off ~10x its fold), not answered
    plain = client.post("/v1/predict", json={"texts": ["a"], "preference": [3, 1, 7]}).json()
    assert "quality_kept" not in plain["results"][0]
    assert canonical_preference([3, 1, 7], TASKS).fingerprint not in client.app.state.service.heads.tradeoffs
    v2 = client.post("/v2/models/reprmerge/infer", json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "parameters": {"quality_kept": "yes"}})
    assert v2.status_code == 422 and v2.json()["field"] == "parameters.quality_kept"
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "uncorrected" in schema["PreferenceResult"]["properties"]["quality_kept"]["description"]
    assert schema["TaskLoss"]["properties"]["quality_kept"]["maximum"] == 1


def test_tradeoff_and_info(client: TestClient, engine: Engine) -> None:
    info = client.get("/v1/info").json()
    assert [t["name"] for t in info["tasks"]] == list(TASKS) and info["limits"]["max_inputs"] == 4
    out = client.post("/v1/tradeoff", json={"preferences": [{"alpha": 1}, [1, 1, 1]]}).json()["results"]
    one_hot, uniform = out[0]["tasks"], out[1]["tasks"]
    assert one_hot["alpha"]["loss"] == pytest.approx(one_hot["alpha"]["best"])
    for t in TASKS:  # the task's own correction is optimal for it
        assert uniform[t]["loss"] >= uniform[t]["best"] - 1e-9


def test_v2_integer_weight_beyond_float_range_is_422_naming_the_field(client: TestClient) -> None:
    """json.loads keeps a 400-digit integer exact; float() of it used to raise OverflowError (500)."""
    for pref in ('{"beta": 1%s}' % ("0" * 400), {"beta": 10**400}):
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "parameters": {"preference": pref}}
        r = client.post("/v2/models/reprmerge/infer", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "parameters.preference.beta" and "at most" in r.json()["detail"]


def test_cached_heads_own_their_storage_and_count_what_they_hold(engine: Engine) -> None:
    """A head that is a view of the (P, K, d) fold output pins all of it: count storage, not elements."""
    heads = engine.fold(_prefs(5))
    K, d = engine.folder.bias.numel(), engine.folder.solver.dim_
    for head in heads:
        assert head.weight.shape == (K, d)
        assert head.weight.untyped_storage().nbytes() == K * d * head.weight.element_size() == head.nbytes
    assert len({h.weight.untyped_storage().data_ptr() for h in heads}) == len(heads)


def test_preference_snapping_shares_one_head(engine: Engine) -> None:
    with _client(engine, preference_grid=10) as c:
        a = c.post("/v1/predict", json={"texts": ["x"], "preference": [0.501, 0.499, 0]}).json()["results"][0]
        b = c.post("/v1/predict", json={"texts": ["x"], "preference": [0.5, 0.5, 0]}).json()["results"][0]
    assert a["fingerprint"] == b["fingerprint"] and a["preference"]["alpha"] == 0.5


def test_draining_turns_readyz_and_predict_to_503(engine: Engine) -> None:
    with _client(engine) as c:
        c.portal.call(c.app.state.service.drain)  # type: ignore[union-attr]
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/predict", json=OK)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["status"] == 503
        assert r.headers["connection"] == "close"  # the server is closing its connections: do not reuse this one
        assert c.get("/livez").status_code == 200


def test_a_500_tells_the_client_to_close_the_connection(engine: Engine) -> None:
    """uvicorn closes the connection after an unhandled error; without `Connection: close` a pool reuses it."""
    with _client(engine) as c:
        def broken(names: object, field: str = "tasks") -> list[str]:
            raise RuntimeError("injected fault")

        c.app.state.service.tasks = broken  # type: ignore[union-attr]
        r = c.post("/v1/predict", json=OK)
        assert r.status_code == 500 and r.headers["connection"] == "close"
        assert "connection" not in c.get("/livez").headers


def test_field_of_drops_locations_and_union_tags() -> None:
    assert field_of(("body", "preference", "dict[str,float]", "a")) == "preference.a"
    assert field_of(("body", "preferences", 1, "list[float]", 0)) == "preferences[1][0]"
    assert field_of(("body",)) == "body"


# -- head cache -----------------------------------------------------------------------------------
def _prefs(n: int) -> list[Preference]:
    return [canonical_preference([i + 1, 1, 0], TASKS) for i in range(n)]


class CountingFold:
    def __init__(self, dim: int = 8) -> None:
        self.calls: list[int] = []
        self.dim = dim

    async def __call__(self, prefs: Sequence[Preference], deadline: float) -> list[Head]:
        self.calls.append(len(prefs))
        await asyncio.sleep(0)
        return [Head(p.fingerprint, torch.zeros(2, self.dim)) for p in prefs]


def test_head_cache_single_flight_batches_misses_and_evicts_by_bytes() -> None:
    fold, metrics = CountingFold(), Metrics()
    head_bytes = 2 * 8 * 4
    cache = SolveCache(fold, 3 * head_bytes, lambda h: h.nbytes, chunk=16, metrics=metrics)
    prefs = _prefs(4)

    async def scenario() -> None:
        # 10 concurrent lookups of the same two preferences: one solve of both.
        results = await asyncio.gather(*(cache.get_many(prefs[:2], math.inf) for _ in range(10)))
        assert fold.calls == [2] and all(set(r) == {p.fingerprint for p in prefs[:2]} for r in results)
        await cache.get_many(prefs[:2], math.inf)  # hits
        assert fold.calls == [2]
        await cache.get_many(prefs[2:], math.inf)  # two more misses, one batched call; budget holds three
        assert fold.calls == [2, 2] and len(cache) == 3 and cache.cost == 3 * head_bytes
        assert prefs[0].fingerprint not in cache  # least recently used went first

    asyncio.run(scenario())
    assert metrics.cache_evictions._value.get() == 1  # type: ignore[attr-defined]


def test_head_cache_solves_misses_in_chunks() -> None:
    fold = CountingFold()
    cache = SolveCache(fold, 1 << 20, lambda h: h.nbytes, chunk=2)
    found = asyncio.run(cache.get_many(_prefs(5), math.inf))
    assert sorted(fold.calls) == [1, 2, 2] and len(found) == 5 and all(isinstance(h, Head) for h in found.values())


@pytest.mark.parametrize("how", ["raise", "short"])
def test_head_cache_failed_or_short_solve_reaches_every_waiter_and_caches_nothing_wrong(how: str) -> None:
    """A raising solve, or one that returns fewer heads than asked, used to leave waiters hanging forever."""
    async def broken(prefs: Sequence[Preference], deadline: float) -> list[Head]:
        await asyncio.sleep(0)
        if how == "raise":
            raise RuntimeError("solver down")
        return [Head(prefs[0].fingerprint, torch.zeros(2, 8))]

    cache = SolveCache(broken, 1 << 20, lambda h: h.nbytes, chunk=16)
    prefs = _prefs(2)

    async def scenario() -> list[dict[str, object]]:
        return await asyncio.wait_for(asyncio.gather(*(cache.get_many(prefs, math.inf) for _ in range(3))), timeout=10)

    for found in asyncio.run(scenario()):
        first, second = found[prefs[0].fingerprint], found[prefs[1].fingerprint]
        assert isinstance(second, ServiceError) and second.status == 500
        assert isinstance(first, ServiceError if how == "raise" else Head)
    assert len(cache) == (0 if how == "raise" else 1)


# -- client ---------------------------------------------------------------------------------------
def _flaky_transport(failures: int, status: int = 429) -> tuple[list[int], httpx.MockTransport]:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) <= failures:
            return httpx.Response(status, headers={"Retry-After": "0"},
                                  json={"type": "t", "title": "busy", "status": status, "detail": "queue full", "request_id": "r"})
        return httpx.Response(200, json={"bundle_id": "b", "results": []})

    return seen, httpx.MockTransport(handler)


def test_client_retries_429_then_succeeds_and_gives_up_with_a_typed_error() -> None:
    seen, transport = _flaky_transport(2)
    with Client("http://svc", transport=transport, max_retries=3) as c:
        assert c.predict(["a"], {"alpha": 1}).bundle_id == "b"
    assert len(seen) == 3
    seen, transport = _flaky_transport(10, status=503)
    with Client("http://svc", transport=transport, max_retries=2) as c, pytest.raises(ProblemError) as err:
        c.predict(["a"])
    assert len(seen) == 3 and err.value.status == 503 and err.value.problem["detail"] == "queue full"


def test_async_client_against_the_app(engine: Engine) -> None:
    async def scenario() -> None:
        app = create_app(ServiceSettings(bundle=engine.bundle.path, device="cpu"), engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://svc", transport=transport) as c:
                out = await c.predict(["hello"], [1, 0, 0])
                assert out.results[0].preference["alpha"] == 1.0
                assert [t.name for t in (await c.info()).tasks] == list(TASKS)
                assert (await c.tradeoff({"beta": 1})).results[0].tasks["beta"].loss > 0
                with pytest.raises(ProblemError) as err:
                    await c.predict(["hello"], {"nope": 1})
                assert err.value.status == 422 and err.value.field == "preference.nope"

    asyncio.run(scenario())


def test_float32_solves_match_float64(engine: Engine) -> None:
    fast = Engine.load(engine.bundle.path, device="cpu", solve_dtype="float32")
    prefs = [canonical_preference(p, TASKS) for p in ([1, 0, 0], [0.2, 0.5, 0.3], [1, 1, 1])]
    z = engine.encode(["a fine day", "a dreadful night"])
    for ref, got in zip(engine.fold(prefs), fast.fold(prefs)):
        assert got.weight.dtype == ref.weight.dtype == torch.float32
        torch.testing.assert_close(z @ got.weight.T, z @ ref.weight.T, rtol=1e-3, atol=1e-3)


def test_the_playground_page_is_public_and_self_contained_while_its_api_calls_need_the_key(client: TestClient) -> None:
    bare = {"Authorization": ""}
    root = client.get("/", headers=bare, follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/playground/"
    assert client.get("/playground", headers=bare, follow_redirects=False).headers["location"] == "/playground/"
    page = client.get("/playground/", headers=bare)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        served = client.get(f"/playground/{asset}", headers=bare)
        assert served.status_code == 200 and kind in served.headers["content-type"] and f'"{asset}"' in page.text
        outside = served.text.replace("http://www.w3.org/2000/svg", "")  # an XML namespace name, never fetched
        assert "http://" not in outside and "https://" not in outside and "//" + "cdn" not in outside
    missing = client.get("/playground/nope.js", headers=bare)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert client.get("/playgroundx", headers=bare).status_code == 401  # only the page's own paths are public
    assert client.get("/v1/info", headers=bare).status_code == 401
    text = client.get("/metrics", headers=bare).text
    assert 'code="200",route="/playground/{path:path}"' in text and 'code="307",route="/"' in text
