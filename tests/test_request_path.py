"""The pipelined request path: tokenise once at admission, batches by a padded-token budget, admission by
estimated wait, one bad text failing only its own request, departed clients never reaching the backbone."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import BertModel

from reprmerge_core.backbone import Backbone
from reprmerge_core.preference import canonical_preference
from service.batcher import Batcher
from service.engine import Engine, HeadGroup
from service.heads import Heads
from service.metrics import Metrics
from service.server import freeze_startup_objects
from service.settings import ServiceSettings
from tests.helpers import make_random_bundle
from tests.test_service_http import ServerProcess

TEXTS = ["hi", "WIN a free cruise, text now! Reply STOP to end " * 4, "", "a dull, lifeless and boring film", "ok then"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_token_ids_equal_the_tokenizers_own_padding(tiny_backbone_dir: Path, side: str) -> None:
    backbone = Backbone.from_pretrained(tiny_backbone_dir, max_length=16, device="cpu")
    backbone.tokenizer.padding_side = side
    reference = backbone.tokenize(TEXTS)
    collated = backbone.collate(backbone.token_ids(TEXTS))
    assert collated.keys() == reference.keys()
    for key in reference:
        assert torch.equal(collated[key], reference[key]), key
    assert max(map(len, backbone.token_ids(TEXTS))) == 16  # truncated at admission already


def test_traced_backbone_equals_eager_and_a_shape_bound_trace_is_refused(tiny_backbone_dir: Path) -> None:
    backbone = Backbone.from_pretrained(tiny_backbone_dir, max_length=16, device="cpu")
    eager = [backbone.encode(texts) for texts in (TEXTS, TEXTS[:1], TEXTS * 7)]
    assert backbone.trace() and backbone.forward is not backbone.model
    for texts, want in zip((TEXTS, TEXTS[:1], TEXTS * 7), eager):
        torch.testing.assert_close(backbone.encode(texts), want, rtol=0, atol=1e-5)

    class ShapeBound(BertModel):  # a branch on the batch size, which a trace freezes
        def forward(self, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> object:
            out = super().forward(input_ids, **kwargs)
            if input_ids.shape[0] > 4:
                out.last_hidden_state = out.last_hidden_state + 1
            return out

    odd = Backbone(ShapeBound.from_pretrained(tiny_backbone_dir), backbone.tokenizer, max_length=16, device="cpu")
    want = odd.encode(TEXTS[:2])
    assert not odd.trace() and odd.forward is odd.model
    torch.testing.assert_close(odd.encode(TEXTS[:2]), want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("path") / "bundle", tiny_backbone_dir, torch.Generator().manual_seed(3))


class RecordingEngine(Engine):
    """The real engine, remembering the (texts, padded width) of every backbone pass."""

    passes: list[tuple[int, int]]

    def embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        self.passes.append((len(rows), max(map(len, rows))))
        return super().embed(rows)


async def _submit_all(engine: Engine, bundle: Path, jobs: Sequence[Sequence[str]], workers: int, *,
                      max_batch_size: int, max_batch_tokens: int, stagger: float = 0.0) -> list[torch.Tensor]:
    """Run `jobs` through a real batcher (heads thread included); each job's probabilities at one preference."""
    pref = canonical_preference([1, 1, 1], engine.tasks)
    infer, metrics = ThreadPoolExecutor(workers), Metrics()
    heads = Heads(engine, ServiceSettings(bundle=bundle), metrics)
    heads.start()
    batcher = Batcher(engine, heads, infer, metrics, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                      workers=workers, max_wait=0.0, queue_limit=100)
    batcher.start()
    try:
        await heads.get_many([pref], time.monotonic() + 30)  # solved before timing matters
        engine.passes = []
        tasks = []
        for texts in jobs:
            tasks.append(asyncio.ensure_future(batcher.submit(engine.token_ids(texts), [pref], time.monotonic() + 30)))
            await asyncio.sleep(stagger)
        return [r.probabilities[0] for r in await asyncio.gather(*tasks)]
    finally:
        await batcher.stop()
        await heads.stop()
        infer.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_respect_the_padded_token_budget_and_text_cap(bundle: Path, workers: int) -> None:
    engine = RecordingEngine.load(bundle, device="cpu")
    long_text, short_text = " ".join(["word"] * 40), "short"
    jobs = [[long_text] * 3, [short_text] * 2, [short_text] * 5, [long_text], [short_text] * 8, [short_text]]
    got = asyncio.run(_submit_all(engine, bundle, jobs, workers, max_batch_size=8, max_batch_tokens=64))
    assert [p.shape[0] for p in got] == [3, 2, 5, 1, 8, 1]
    widths = {len(engine.token_ids([t])[0]) for t in (long_text, short_text)}
    assert widths == {3, 32}  # [CLS] short [SEP]; the long text truncated at the bundle's max length
    for texts, width in engine.passes:
        # Every pass within both budgets: a request over them (3 long texts: 96 tokens) is split.
        assert texts <= 8 and texts * width <= 64, engine.passes
    assert sum(t for t, _ in engine.passes) == 20
    assert any(t > 1 and w == 3 for t, w in engine.passes), "short requests were never batched together"
    # Each answer is its texts' own, whatever passes they rode in: the engine's answer to them alone.
    head = engine.fold([canonical_preference([1, 1, 1], engine.tasks)])[0]
    for texts, probs in zip(jobs, got):
        want = engine.apply(engine.encode(texts), [HeadGroup(head, list(range(len(texts))))])[0]
        torch.testing.assert_close(probs, want, rtol=0, atol=1e-5)


def test_idle_workers_share_one_request_and_its_answer_is_unchanged(bundle: Path) -> None:
    """A 16-text request on two idle workers runs as two 8-text passes at once; answers equal one pass's."""
    engine = RecordingEngine.load(bundle, device="cpu")
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(16)]
    alone = asyncio.run(_submit_all(engine, bundle, [texts], 1, max_batch_size=32, max_batch_tokens=8192))
    assert engine.passes and [t for t, _ in engine.passes] == [16]
    shared = asyncio.run(_submit_all(engine, bundle, [texts], 2, max_batch_size=32, max_batch_tokens=8192))
    assert sorted(t for t, _ in engine.passes) == [8, 8]
    torch.testing.assert_close(shared[0], alone[0], rtol=0, atol=1e-5)
    # Small requests are not split below MIN_SHARE texts a pass: a 5-text request runs whole.
    asyncio.run(_submit_all(engine, bundle, [texts[:5]], 2, max_batch_size=32, max_batch_tokens=8192))
    assert [t for t, _ in engine.passes] == [5]


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Two inference workers: two batches on the backbone at once, as on a multi-core CPU by default.
    srv = ServerProcess(bundle, tmp_path_factory.mktemp("logs") / "path.log", "--max-batch-size", "32",
                        "--inference-workers", "2")
    yield srv
    srv.stop()


def test_one_untokenisable_text_fails_only_its_own_request(server: ServerProcess) -> None:
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            good = [c.post("/v1/predict", json={"texts": ["fine words", "more words"]}) for _ in range(20)]
            bad = c.post("/v1/predict", content=b'{"texts": ["ok", "\\ud800"]}', headers={"Content-Type": "application/json"})
            return await asyncio.gather(bad, *good)

    bad, *good = asyncio.run(scenario())
    assert bad.status_code == 422 and bad.json()["field"] == "texts[1]", bad.text
    assert [r.status_code for r in good] == [200] * 20


def _post_raw(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def minilm_server(minilm_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real MiniLM backbone: a queue must build up behind it (the 32-wide test model answers 60
    full batches in well under a second)."""
    srv = ServerProcess(minilm_bundle, tmp_path_factory.mktemp("logs") / "minilm.log", "--max-batch-size", "32",
                        "--inference-workers", "2")
    yield srv
    srv.stop()


def test_departed_clients_texts_never_reach_the_backbone(minilm_server: ServerProcess) -> None:
    server = minilm_server
    busy = {"texts": [" ".join(["busy"] * 30)] * 32}
    departed = b'{"texts": [' + b", ".join([b'"gone"'] * 7) + b"]}"
    encoded_before = server.metric("reprmerge_batch_size_sum")
    gone_before = server.metric('reprmerge_rejections_total{reason="client_gone"}')

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            load = asyncio.gather(*(c.post("/v1/predict", json=busy, headers={"X-Request-Timeout": "300"})
                                    for _ in range(60)))
            # Hang up once the backbone is busy with a long queue behind it.
            await asyncio.to_thread(_wait_for, lambda: server.metric("reprmerge_queue_depth") >= 10)
            sock = _post_raw(server.port, departed)
            await asyncio.sleep(0.05)
            sock.close()
            return await load

    codes = [r.status_code for r in asyncio.run(scenario())]
    assert codes == [200] * 60, codes
    _wait_for(lambda: server.metric('reprmerge_rejections_total{reason="client_gone"}') > gone_before, 10)
    assert server.metric('reprmerge_rejections_total{reason="client_gone"}') == gone_before + 1
    assert server.metric("reprmerge_batch_size_sum") - encoded_before == 60 * 32  # the 7 departed texts never ran


def test_admission_refuses_what_would_miss_its_deadline_with_an_honest_retry_after(minilm_bundle: Path, tmp_path: Path) -> None:
    # The real MiniLM backbone: admission must weigh backbone time, which the 32-wide test model barely has.
    srv = ServerProcess(minilm_bundle, tmp_path / "admission.log", "--max-batch-size", "32", "--inference-workers", "2")
    body = {"texts": [" ".join(["long"] * 30)] * 32}
    try:
        batch = float(httpx.post(f"{srv.url}/v1/predict", json=body).headers["x-inference-time"])
        timeout = 10 * batch  # room for ~10 batches; 40 requests of one full batch each arrive at once

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=100)) as c:
                return await asyncio.gather(*(c.post("/v1/predict", json=body, headers={"X-Request-Timeout": f"{timeout:.4f}"})
                                              for _ in range(40)))

        responses = asyncio.run(scenario())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429, 504} and codes.count(200) > 0 and codes.count(429) > 0, codes
        # Refused at the door instead of timing out in the queue.
        assert codes.count(504) <= codes.count(429) // 4, codes
        refused = [r for r in responses if r.status_code == 429]
        # Retry-After covers the queued work it saw: at least a second, never much more than the whole burst.
        assert all(1 <= int(r.headers["retry-after"]) <= 40 * batch * 3 + 1 for r in refused)
        assert "deadline" in refused[0].json()["detail"]
        assert srv.metric('reprmerge_rejections_total{reason="overloaded"}') == len(refused)
    finally:
        srv.stop()


_FAULTS = """
import ctypes, ctypes.util, resource, sys, torch
from service.server import MALLOC_SETTINGS, M_MMAP_THRESHOLD, tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
else:  # the setting before: glibc's mmap threshold pinned at 128 KiB
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 << 10)
torch.set_num_threads(1)
x, w = torch.randn(256, 384), torch.randn(384, 1536)
def step():  # one layer's worth of activations: (256, 1536) float32 = 1.5 MiB, freed at once
    return (x @ w).relu().sum()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and Linux fault counters")
def test_the_servers_malloc_setting_reuses_activation_memory_instead_of_faulting_it_in() -> None:
    """With glibc's mmap threshold pinned at 128 KiB every backbone pass mmapped its activations and
    page-faulted them in afresh (+30% CPU per text); `tune_malloc` keeps them in the arenas."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env,
                             cwd=Path(__file__).parents[1], check=True).stdout
        return float(out)

    tuned, pinned = faults("tuned"), faults("pinned")
    assert pinned > 300, pinned  # the old setting: ~380 faults (1.5 MiB / 4 KiB) per step
    assert tuned < pinned / 5, (tuned, pinned)  # ~0 on an idle machine; a few stray faults under load


def test_startup_objects_are_frozen_out_of_full_collections() -> None:
    """A full collection walked every torch/transformers object: ~0.5 s with the GIL held, per collection."""
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 10_000  # this test process has torch and transformers loaded
        assert len(gc.get_objects()) < frozen / 10  # what a full collection still walks
    finally:
        gc.unfreeze()
