"""`reprmerge bench serve`: what serving per-request preferences costs, against the backbone alone.

Engine, in-process, at one batch size (texts per backbone pass):
  (a) backbone only (tokenise + encode): the ceiling;
  (b) mixed batches over 1, 32 and 1000 distinct cached preferences (heads applied per group);
  (c) every request a new preference (one batched fold of the batch's preferences + forward);
  (d) baseline: a re-merged model per preference (preference-weighted task arithmetic from
      reprmerge_core.merging, load_state_dict, one forward per preference);
plus the latency of one head solve (all task heads fused). Then the same service over HTTP with an
open-loop load generator (Poisson arrivals, so no coordinated omission): p50/p95/p99, throughput,
goodput within an SLO, head-cache hit rate and distinct heads per batch.
Without --bundle, a bundle over the real MiniLM backbone (d = 384) is synthesised: statistics from
its own features of generated sentences and a random near-identity "expert" map, random heads.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, CorrectionInfo, MergeInfo, TaskInfo
from reprmerge_core.correction import StatisticsAccumulator, TaskHead
from reprmerge_core.merging.arithmetic import task_arithmetic
from reprmerge_core.preference import Preference, canonical_preference
from service.engine import Engine, Head, HeadGroup, solve_executor

WORDS = ("model merging keeps one backbone for many tasks while a small closed form correction restores each "
         "task representation the service batches requests with different preferences through one forward pass "
         "and folds the correction into the heads so latency stays flat").split()
SYNTHETIC_TASKS = {"sentiment": ["negative", "positive"], "topic": ["world", "sports", "business", "science"],
                   "question": ["abbr", "entity", "description", "human", "location", "number"]}
SLO_SECONDS = 0.5
DISTINCT = (1, 32, 1000)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def synthetic_bundle(out: Path, samples: int = 512, seed: int = 0) -> Path:
    """A valid bundle over MiniLM: real merged features, a perturbed linear 'expert' per task, random heads."""
    src = default_backbone_path()
    backbone = Backbone.from_pretrained(src, device="cpu")
    z = backbone.encode(sentences(samples, seed)).double()
    g = torch.Generator().manual_seed(seed)
    d = z.shape[1]
    stats, heads = [], []
    for labels in SYNTHETIC_TASKS.values():
        expert_map = torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)
        acc = StatisticsAccumulator(d)
        acc.update(z, z @ expert_map.T)
        stats.append(acc.result())
        heads.append(TaskHead(torch.randn(len(labels), d, generator=g), torch.randn(len(labels), generator=g)))
    return write_bundle(
        out, tasks=[TaskInfo(name=t, labels=l, calibration_samples=samples) for t, l in SYNTHETIC_TASKS.items()],
        statistics=stats, heads=heads, backbone_dir=src,
        correction=CorrectionInfo(beta=0.1, normalisation="energy"),
        merge=MergeInfo(method="none", parameters={"note": "benchmark bundle: statistics of synthetic experts"}),
        backbone=BackboneInfo(source="sentence-transformers/all-MiniLM-L6-v2", pooling="mean", max_length=128),
    )


def dirichlet(n: int, tasks: tuple[str, ...], seed: int) -> list[Preference]:
    """n uniform draws from the simplex (normalised exponentials: Dirichlet(1, ..., 1)), canonicalised."""
    g = torch.Generator().manual_seed(seed)
    draws = -torch.log(torch.rand(n, len(tasks), generator=g, dtype=torch.float64))
    return [canonical_preference(row.tolist(), tasks) for row in draws]


class EngineBench:
    """The engine cases (a)-(d) over fixed batches of texts.

    Cases run round-robin, one batch each per round, and report the median: on a shared CPU the
    load drifts, and interleaving keeps the ratios between cases fair.
    """

    def __init__(self, engine: Engine, batch_size: int, rounds: int) -> None:
        self.engine, self.batch_size, self.rounds = engine, batch_size, rounds
        self.texts = [sentences(batch_size, seed=100 + i) for i in range(rounds)]
        self.heads_thread = solve_executor()
        self._seed = 10_000

    def _fresh(self, n: int) -> list[Preference]:
        self._seed += 1
        return dirichlet(n, self.engine.tasks, seed=self._seed)

    def _fold(self, prefs: list[Preference]) -> dict[str, Head]:
        """Fold as the service does: on the single-threaded solve executor."""
        return {h.fingerprint: h for h in self.heads_thread.submit(self.engine.fold, prefs).result()}

    def _apply(self, z: torch.Tensor, prefs: list[Preference], heads: dict[str, Head]) -> None:
        """Apply heads as the service does: grouped by head, on the heads thread."""
        rows: dict[str, list[int]] = {}
        for i, p in enumerate(prefs):
            rows.setdefault(p.fingerprint, []).append(i)
        self.heads_thread.submit(self.engine.apply, z, [HeadGroup(heads[fp], r) for fp, r in rows.items()]).result()

    def _pools(self, distinct: tuple[int, ...]) -> dict[int, tuple[list[Preference], dict[str, Head]]]:
        pools = {}
        for n in distinct:
            pool = dirichlet(n, self.engine.tasks, seed=n)
            pools[n] = pool, {fp: h for start in range(0, n, 256) for fp, h in self._fold(pool[start:start + 256]).items()}
        return pools

    def cases(self, distinct: tuple[int, ...] = DISTINCT) -> dict[str, Callable[[list[str]], None]]:
        """name -> step(texts): one batch of the case, done the way the batcher does it."""
        engine = self.engine
        steps: dict[str, Callable[[list[str]], None]] = {"(a) backbone only": engine.encode}
        rng = random.Random(0)
        for n, (pool, heads) in self._pools(distinct).items():
            steps[f"(b) {n} distinct cached preferences"] = (
                lambda texts, pool=pool, heads=heads: self._apply(engine.encode(texts), [rng.choice(pool) for _ in texts], heads))

        def fresh(texts: list[str]) -> None:  # solves overlap the backbone pass, as in the batcher
            prefs = self._fresh(len(texts))
            solving = self.heads_thread.submit(engine.fold, prefs)
            z = engine.encode(texts)
            self._apply(z, prefs, {h.fingerprint: h for h in solving.result()})

        steps["(c) new preference per request"] = fresh
        return steps

    def components(self, repeats: int = 30, distinct: tuple[int, ...] = DISTINCT) -> dict[str, float]:
        """Median milliseconds of each part of a batch, timed alone: small parts are precise this way."""
        def median_ms(fn: Callable[[], object]) -> float:
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return 1e3 * statistics.median(times)

        texts = self.texts[0]
        z = self.engine.encode(texts)
        rng = random.Random(1)
        parts = {"backbone": median_ms(lambda: self.engine.encode(texts))}
        for n, (pool, heads) in self._pools(distinct).items():
            parts[f"heads, {n} distinct"] = median_ms(lambda pool=pool, heads=heads: self._apply(z, [rng.choice(pool) for _ in texts], heads))
        parts[f"fold {len(texts)} new"] = median_ms(lambda: self._fold(self._fresh(len(texts))))
        return parts

    def run(self) -> dict[str, dict[str, float]]:
        """Per case: texts/s (wall) and ratios to (a) by wall and by process CPU time.

        Cases are interleaved round by round and ratios taken per round (paired), medians reported.
        On a shared CPU wall time swings with other tenants; CPU time of this process (all its
        threads) measures the work itself, so its ratio is the capacity ratio a dedicated core would see.
        """
        steps = self.cases()
        walls: dict[str, list[float]] = {name: [] for name in steps}
        cpus: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():  # warm-up
            step(self.texts[0])
        for r in range(self.rounds):
            for name, step in steps.items():
                wall, cpu = time.perf_counter(), time.process_time()
                step(self.texts[r])
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
        a = "(a) backbone only"
        return {name: {
            "texts_per_s": self.batch_size / statistics.median(walls[name]),
            "ratio_wall": statistics.median(x / y for x, y in zip(walls[a], walls[name])),
            "ratio_cpu": statistics.median(x / y for x, y in zip(cpus[a], cpus[name])),
        } for name in steps}

    def solve_ms(self, repeats: int = 50) -> tuple[float, float]:
        """Median wall and thread-CPU milliseconds of folding one new preference (all task heads).

        Run on the solve thread as in the service; CPU time is what the solve costs when the machine
        is shared, wall time what a request waits.
        """
        def one(pref: Preference) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.thread_time()
            self.engine.fold([pref])
            return time.perf_counter() - wall, time.thread_time() - cpu

        prefs = self._fresh(repeats + 1)
        self.heads_thread.submit(one, prefs[-1]).result()
        walls, cpus = zip(*(self.heads_thread.submit(one, p).result() for p in prefs[:repeats]))
        return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)

    def remerge(self, preferences: int = 4) -> float:
        """Baseline (d), texts/s: per preference theta_p = theta_0 + lam sum_k (T p_k) tau_k, load, encode its text.

        Measured over `preferences` preferences (one text each) and reported per text, which is the
        rate a batch of all-distinct preferences would get.
        """
        model = self.engine.backbone.model
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(3)
        # Synthetic experts: every encoder tensor moved (the project's experts keep embeddings frozen).
        tuned = [k for k, v in base.items() if v.is_floating_point() and "embeddings" not in k]
        deltas = {k: 0.01 * torch.randn((len(self.engine.tasks), *base[k].shape), generator=g) for k in tuned}
        T = len(self.engine.tasks)
        texts = self.texts[0][:preferences]
        try:
            start = time.perf_counter()
            for text, pref in zip(texts, self._fresh(len(texts))):
                coef = torch.tensor(pref.weights, dtype=torch.float32) * T
                merged = {k: base[k] + task_arithmetic(deltas[k] * coef.view(-1, *[1] * base[k].ndim), 0.3) for k in tuned}
                model.load_state_dict(merged, strict=False)
                self.engine.encode([text])
            return len(texts) / (time.perf_counter() - start)
        finally:
            model.load_state_dict(base)


# -- HTTP ------------------------------------------------------------------------------------------
def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def _scrape(client: httpx.AsyncClient) -> str:
    """The server's /metrics text, or "" when it cannot be read (the figures from it become NaN, nothing raises)."""
    try:
        return (await client.get("/metrics")).text
    except httpx.HTTPError:
        return ""


# Below the server's keep-alive timeout (uvicorn: 5 s by default): a pooled connection the server is
# closing at the same instant is a reset on reuse (the race that crashed this benchmark).
KEEPALIVE_EXPIRY = 2.0


async def open_loop(url: str, rate: float, seconds: float, prefs: Callable[[int], list[float]]) -> dict[str, float]:
    """Poisson arrivals at `rate` requests/s for `seconds`; one text per request.

    Transport errors are counted by kind (`errors`), never raised: a benchmark reports failures.
    """
    rng = random.Random(0)
    texts = sentences(256, seed=5)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=KEEPALIVE_EXPIRY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        before = await _scrape(client)

        async def one(i: int) -> None:
            start = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json={"texts": [texts[i % len(texts)]], "preference": prefs(i)})
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)

        tasks, start, i = [], time.perf_counter(), 0
        next_at = start
        while next_at - start < seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        after = await _scrape(client)
    delta = {n: _metric(after, n) - _metric(before, n) for n in (
        "reprmerge_head_cache_hits_total", "reprmerge_head_cache_misses_total",
        "reprmerge_batch_distinct_heads_sum", "reprmerge_batch_distinct_heads_count", "reprmerge_batch_size_sum")}
    lat = sorted(latencies) or [float("nan")]
    pct = lambda q: 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    lookups = delta["reprmerge_head_cache_hits_total"] + delta["reprmerge_head_cache_misses_total"]
    batches = max(delta["reprmerge_batch_distinct_heads_count"], 1)
    return {
        "offered_rps": rate, "sent": i, "ok": len(latencies), "rejected": sum(codes.values()) - len(latencies),
        "transport_errors": sum(errors.values()), "errors": errors,
        "throughput_rps": len(latencies) / elapsed, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
        "goodput_rps": sum(1 for x in latencies if x <= SLO_SECONDS) / elapsed,
        "cache_hit_rate": delta["reprmerge_head_cache_hits_total"] / lookups if lookups else float("nan"),
        "heads_per_batch": delta["reprmerge_batch_distinct_heads_sum"] / batches,
        "texts_per_batch": delta["reprmerge_batch_size_sum"] / batches,
    }


class BenchServer:
    """`reprmerge serve` as a child process on a free port, its output in a log file (never /dev/null).

    The log's path is printed at start; it is removed after a clean run and kept (path printed again)
    when anything went wrong, so a failed benchmark can be explained.
    """

    def __init__(self, bundle: Path, *flags: str, log: Path | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._temporary_log = log is None
        self.log = log or Path(tempfile.mkstemp(prefix="reprmerge-bench-server-", suffix=".log")[1])
        print(f"server log: {self.log}")
        cmd = [sys.executable, "-c", "import sys; from reprmerge_core.cli import main; sys.exit(main())",
               "serve", str(bundle), "--port", str(self.port), *flags]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"benchmark server exited with {self.proc.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"benchmark server not ready after {timeout:g} s; see {self.log}")
            time.sleep(0.2)

    def __enter__(self) -> BenchServer:
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        died = self.proc.poll() is not None
        if not died:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if exc_type is None and not died and self.proc.returncode == 0 and self._temporary_log:
            self.log.unlink(missing_ok=True)
        else:
            print(f"server exited with {self.proc.returncode}; its log is kept at {self.log}")


def http_bench(bundle: Path, tasks: tuple[str, ...], rate: float, seconds: float) -> dict[str, dict[str, float]]:
    with BenchServer(bundle, "--queue-limit", "4096", "--log-level", "warning") as server:
        grid = [p.weights for p in dirichlet(32, tasks, seed=11)]
        zipf = random.Random(1)
        zipf_weights = [1 / (k + 1) for k in range(len(grid))]
        fresh = random.Random(2)
        scenarios: dict[str, Callable[[int], list[float]]] = {
            "1 preference": lambda i: grid[0],
            "Zipf over 32": lambda i: zipf.choices(grid, zipf_weights)[0],
            "fresh each request": lambda i: [fresh.random() + 1e-3 for _ in tasks],
        }
        return {name: asyncio.run(open_loop(server.url, rate, seconds, fn)) for name, fn in scenarios.items()}


def run_benchmark(bundle: Path | None, *, batch_size: int, batches: int, http_seconds: float, rate: float,
                  out: Path | None, solve_dtype: str = "float64") -> dict[str, Any]:
    """Run every case, print the table, optionally write JSON; returns the results."""
    with tempfile.TemporaryDirectory(prefix="reprmerge-bench-") as tmp:
        bundle = bundle or synthetic_bundle(Path(tmp) / "bundle")
        engine = Engine.load(bundle, device="cpu", solve_dtype=solve_dtype)
        print(f"head solves in {solve_dtype}")
        bench = EngineBench(engine, batch_size, batches)
        speeds = bench.run()
        remerge = bench.remerge()
        ceiling = speeds["(a) backbone only"]["texts_per_s"]
        speeds["(d) re-merged model per preference"] = {"texts_per_s": remerge, "ratio_wall": remerge / ceiling, "ratio_cpu": float("nan")}
        solve_wall, solve_cpu = bench.solve_ms()
        targets = {"(a) backbone only": "ceiling", "(b) 32 distinct cached preferences": ">= 0.97",
                   "(c) new preference per request": ">= 0.80", "(d) re-merged model per preference": "baseline"}
        print(f"\nengine, in-process: batch {batch_size} texts, {torch.get_num_threads()} threads, "
              f"d = {engine.folder.solver.dim_}, T = {len(engine.tasks)}, K = {engine.folder.bias.numel()}; "
              f"medians of {batches} interleaved rounds")
        print(f"{'case':<40} {'texts/s':>9} {'x (a) wall':>11} {'x (a) CPU':>10}  target")
        for name, r in speeds.items():
            print(f"{name:<40} {r['texts_per_s']:>9.1f} {r['ratio_wall']:>11.3f} {r['ratio_cpu']:>10.3f}  {targets.get(name, '')}")
        print(f"one head solve (all task heads fused): {solve_wall:.2f} ms wall, {solve_cpu:.2f} ms CPU  (target <= 3 ms)")
        parts = bench.components()
        backbone = parts["backbone"]
        print("\nparts of one batch, each timed alone (ms; ratio = backbone / (backbone + part), no overlap credit):")
        for name, ms in parts.items():
            print(f"  {name:<24} {ms:>9.2f}" + ("" if name == "backbone" else f"   ratio {backbone / (backbone + ms):.3f}"))
        results: dict[str, Any] = {"batch_size": batch_size, "solve_ms": {"wall": solve_wall, "cpu": solve_cpu},
                                   "engine": speeds, "parts_ms": parts}
        if http_seconds > 0:
            offered = rate or 0.5 * speeds["(b) 32 distinct cached preferences"]["texts_per_s"]  # half capacity, 1 text/request
            results["http"] = http_bench(Path(bundle), engine.tasks, offered, http_seconds)
            print(f"\nHTTP, open loop at {offered:.0f} req/s for {http_seconds:g} s, 1 text per request, SLO {SLO_SECONDS * 1e3:.0f} ms")
            print(f"{'preferences':<20} {'ok/sent':>10} {'req/s':>7} {'goodput':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'hit rate':>8} {'heads/b':>7} {'texts/b':>7}  errors")
            for name, r in results["http"].items():
                print(f"{name:<20} {r['ok']:>4}/{r['sent']:<5} {r['throughput_rps']:>7.1f} {r['goodput_rps']:>8.1f} "
                      f"{r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['cache_hit_rate']:>8.3f} "
                      f"{r['heads_per_batch']:>7.2f} {r['texts_per_batch']:>7.2f}  {r['errors'] or '-'}")
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    return results
