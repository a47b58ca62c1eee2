"""`reprmerge bench serve`: what serving per-request preferences costs, against the backbone alone.

Engine, in-process, at one batch size (texts per backbone pass):
  (a) backbone only (tokenise + encode): the ceiling;
  (b) mixed batches over 1, 32 and 1000 distinct cached preferences (heads applied per group);
  (c) every request a new preference (one batched fold of the batch's preferences + forward);
  (d) baseline: a re-merged model per preference (preference-weighted task arithmetic from
      reprmerge_core.merging, load_state_dict, one forward per preference);
plus the latency of one head solve (all task heads fused). Then the same bundle served over HTTP
(`reprmerge serve` as a child process, max batch size = the engine's batch size, its log in a file):
  - saturated: a closed loop with enough connections to keep full batches queued, at 1 and 16 texts
    per request; texts/s against engine case (b) with 32 preferences (the same Zipf-drawn grid);
  - open loop (Poisson arrivals, no coordinated omission) at 50% and 80% of each saturated rate:
    p50/p95/p99, goodput within the SLO, errors by kind; and fresh preferences at 50%.
Load comes from `reprmerge_bench.loadgen` (wrk when installed, else raw asyncio), whose CPU share is
reported. Texts are drawn from the real task data (the bundle's tasks when known, else the tiny suite's),
so their lengths are those the service meets. Failures are counted and reported, never raised.
Without --bundle, a bundle over the real MiniLM backbone (d = 384) is synthesised: statistics from
its own features of generated sentences and a random near-identity "expert" map, random heads.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from reprmerge_bench.loadgen import run_load, wrk_available
from reprmerge_bench.server import LocalServer
from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, CorrectionInfo, MergeInfo, TaskInfo
from reprmerge_core.correction import StatisticsAccumulator, TaskHead
from reprmerge_core.data.splits import SUITES
from reprmerge_core.data.tasks import TASK_NAMES, load_task
from reprmerge_core.merging import resolve
from reprmerge_core.preference import Preference, canonical_preference
from service.client import Client, ClientError
from service.engine import Engine, Head, HeadGroup, torch_executor
from service.server import tune_malloc
from service.settings import ServiceSettings

WORDS = ("model merging keeps one backbone for many tasks while a small closed form correction restores each "
         "task representation the service batches requests with different preferences through one forward pass "
         "and folds the correction into the heads so latency stays flat").split()
SYNTHETIC_TASKS = {"sentiment": ["negative", "positive"], "topic": ["world", "sports", "business", "science"],
                   "question": ["abbr", "entity", "description", "human", "location", "number"]}
SLO_SECONDS = 0.5
DISTINCT = (1, 32, 1000)
MAX_TEXT_CHARS = 2000  # a few source rows are whole concatenated files; the backbone reads 128 tokens anyway
TEXTS_PER_REQUEST = (1, 16)
OPEN_LOOP_LOADS = (0.5, 0.8)  # fractions of the saturated rate


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def suite_texts(tasks: tuple[str, ...], n: int, seed: int = 0) -> list[str]:
    """n texts drawn from real task data, each task equally likely: the bundle's tasks where known,
    else the tiny suite's. Synthetic sentences only when the data packages are not installed."""
    names = [t for t in tasks if t in TASK_NAMES] or list(SUITES["tiny"].tasks)
    try:
        pools = [[x for x in load_task(name).texts if len(x) <= MAX_TEXT_CHARS] for name in names]
    except FileNotFoundError as e:
        print(f"no real texts ({e}); using synthetic sentences")
        return sentences(n, seed)
    rng = random.Random(seed)
    return [rng.choice(rng.choice(pools)) for _ in range(n)]


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

    def __init__(self, engine: Engine, batch_size: int, rounds: int, texts: list[str]) -> None:
        self.engine, self.batch_size, self.rounds = engine, batch_size, rounds
        self.texts = [[texts[(r * batch_size + i) % len(texts)] for i in range(batch_size)] for r in range(rounds)]
        self.heads_thread = torch_executor("heads", 1)
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

    def parallel(self, name: str, workers: int, threads: int) -> float:
        """texts/s of case `name` run as the server runs it: `workers` batches at once, `threads` each."""
        step = self.cases()[name]
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            list(pool.map(step, self.texts[:workers]))  # warm-up, every worker
            start = time.perf_counter()
            list(pool.map(step, self.texts))
            return self.batch_size * self.rounds / (time.perf_counter() - start)

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
        backbone = self.engine.backbone
        model, traced = backbone.model, backbone.forward
        backbone.forward = model  # a trace has its weights frozen in: re-merging needs the eager module
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(3)
        # Synthetic experts: every encoder tensor moved (the project's experts keep embeddings frozen).
        tuned = [k for k, v in base.items() if v.is_floating_point() and "embeddings" not in k]
        deltas = {k: 0.01 * torch.randn((len(self.engine.tasks), *base[k].shape), generator=g).to(base[k].device)
                  for k in tuned}
        T = len(self.engine.tasks)
        rule, params = resolve("task_arithmetic", {"lam": 0.3})  # the registry's rule, in the model's dtype
        texts = self.texts[0][:preferences]
        try:
            start = time.perf_counter()
            for text, pref in zip(texts, self._fresh(len(texts))):
                coef = torch.tensor(pref.weights, dtype=torch.float32, device=model.device) * T
                merged = {k: base[k] + rule.tensor_rule(deltas[k], params, k, coef) for k in tuned}
                model.load_state_dict(merged, strict=False)
                self.engine.encode([text])
            return len(texts) / (time.perf_counter() - start)
        finally:
            model.load_state_dict(base)
            backbone.forward = traced


# -- HTTP ------------------------------------------------------------------------------------------
SERVER_METRICS = ("reprmerge_head_cache_hits_total", "reprmerge_head_cache_misses_total",
                  "reprmerge_batch_distinct_heads_sum", "reprmerge_batch_distinct_heads_count",
                  "reprmerge_batch_size_sum", "reprmerge_queue_depth", "reprmerge_in_flight_requests")


def _scrape(server: LocalServer) -> dict[str, float]:
    """The server's counters used here; NaN when /metrics cannot be read (nothing raises)."""
    try:
        values = server.metrics()
    except OSError:
        return {name: math.nan for name in SERVER_METRICS}
    return {name: values.get(name, 0.0) for name in SERVER_METRICS}


def request_bodies(texts: list[str], per_request: int, prefs: Callable[[int], list[float]], n: int) -> list[bytes]:
    """n JSON bodies of `per_request` texts each, preference i from `prefs(i)`."""
    return [json.dumps({"texts": [texts[(i * per_request + j) % len(texts)] for j in range(per_request)],
                        "preference": prefs(i)}).encode() for i in range(n)]


def _wait_idle(server: LocalServer, timeout: float = 120) -> None:
    """Until the server has no queued work and no request but the scrape in flight: a run must not
    inherit the previous run's backlog (a closed loop leaves its last requests queued)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _scrape(server)
        if m["reprmerge_queue_depth"] == 0 and m["reprmerge_in_flight_requests"] <= 1:
            return
        time.sleep(0.2)


def http_run(server: LocalServer, name: str, bodies: list[bytes], per_request: int, seconds: float, *,
             connections: int = 0, rate: float = 0.0, generator: str = "auto") -> dict[str, Any]:
    """One load run with the server's counters around it: the load record plus throughput, goodput and cache figures."""
    _wait_idle(server)
    before = _scrape(server)
    r = run_load(server.url, bodies, seconds, connections=connections, rate=rate, generator=generator,
                 slo=SLO_SECONDS)
    after = _scrape(server)
    delta = {k: after[k] - before[k] for k in SERVER_METRICS}
    elapsed = r["elapsed_s"] if r["elapsed_s"] == r["elapsed_s"] and r["elapsed_s"] > 0 else seconds
    failed = sum(r["errors"].values()) + sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    lookups = delta["reprmerge_head_cache_hits_total"] + delta["reprmerge_head_cache_misses_total"]
    batches = delta["reprmerge_batch_distinct_heads_count"]
    r.update(name=name, texts_per_request=per_request, connections=connections, offered_rps=rate,
             throughput_rps=r["ok"] / elapsed, texts_per_s=r["ok"] * per_request / elapsed, failed=failed,
             cache_hit_rate=delta["reprmerge_head_cache_hits_total"] / lookups if lookups else math.nan,
             heads_per_batch=delta["reprmerge_batch_distinct_heads_sum"] / batches if batches else math.nan,
             texts_per_batch=delta["reprmerge_batch_size_sum"] / batches if batches else math.nan)
    r["goodput_rps"] = r["within_slo"] / elapsed  # NaN from wrk: it keeps no per-request latencies
    if failed:
        server.failed = True  # keep the server's log
    print(f"  {name}: {r['throughput_rps']:.1f} req/s, {r['texts_per_s']:.1f} texts/s, p99 {r['p99_ms']:.0f} ms, "
          f"{failed} failed {r['errors'] or ''}", flush=True)
    return r


def http_bench(bundle: Path, tasks: tuple[str, ...], texts: list[str], *, batch_size: int, seconds: float,
               generator: str, connections: int, server_log: Path | None, device: str) -> list[dict[str, Any]]:
    """Saturated closed loops at 1 and 16 texts per request, then open loops at fractions of each saturated rate."""
    grid = [p.weights for p in dirichlet(32, tasks, seed=11)]
    zipf = random.Random(1)
    zipf_weights = [1 / (k + 1) for k in range(len(grid))]
    fresh = random.Random(2)

    def zipf_pref(i: int) -> list[float]:
        return zipf.choices(grid, zipf_weights)[0]

    def fresh_pref(i: int) -> list[float]:
        return [fresh.random() + 1e-3 for _ in tasks]

    rows: list[dict[str, Any]] = []
    flags = ("--max-batch-size", str(batch_size), "--queue-limit", "4096", "--log-level", "warning", "--device", device)
    with LocalServer(bundle, server_log, *flags) as server:
        with Client(server.url, timeout=60) as warm:  # every grid head cached, the model warm
            for pref in grid:
                try:
                    warm.predict(texts[:4], pref)
                except ClientError as e:
                    print(f"  warm-up request failed: {e}")
                    server.failed = True
        for per_request in TEXTS_PER_REQUEST:
            bodies = request_bodies(texts, per_request, zipf_pref, max(64, 4096 // per_request))
            # Enough requests in flight for several full batches queued behind the running one.
            conns = connections or max(8, 4 * batch_size // per_request)
            unit = f"{per_request} text{'s' * (per_request > 1)}/req"
            sat = http_run(server, f"saturated, {unit}", bodies, per_request, seconds, connections=conns,
                           generator=generator)
            rows.append(sat)
            for load in OPEN_LOOP_LOADS:
                if sat["throughput_rps"] > 0:
                    rows.append(http_run(server, f"open {load:.0%}, {unit}", bodies, per_request, seconds,
                                         rate=load * sat["throughput_rps"]))
        if rows[0]["throughput_rps"] > 0:
            bodies = request_bodies(texts, 1, fresh_pref, 4096)
            rows.append(http_run(server, f"open {OPEN_LOOP_LOADS[0]:.0%}, 1 text/req, fresh prefs", bodies, 1,
                                 seconds, rate=OPEN_LOOP_LOADS[0] * rows[0]["throughput_rps"]))
    return rows


def print_table(results: dict[str, Any]) -> None:
    """The one summary table: engine cases, then HTTP runs against the engine."""
    engine = results["engine"]
    reference = max(r["texts_per_s"] for name, r in engine.items() if name.startswith(ENGINE_REFERENCE))
    print(f"\n== reprmerge bench serve: batch {results['batch_size']} texts on {results['device']}, "
          f"{results['threads']} threads, "
          f"d = {results['dim']}, T = {results['tasks']}, K = {results['classes']}, "
          f"solves in {results['solve_dtype']}; "
          f"texts from {results['text_source']}, median {results['median_text_words']} words ==")
    print(f"{'case':<62} {'texts/s':>8} {'ratio':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'ok/sent':>12} {'good/s':>7} {'hit':>5} {'texts/b':>7} {'gen CPU':>8}  errors")
    for name, r in engine.items():
        cpu = f" (CPU {r['ratio_cpu']:.3f})" if r["ratio_cpu"] == r["ratio_cpu"] else ""
        print(f"{'engine ' + name:<62} {r['texts_per_s']:>8.1f} {r['ratio_wall']:>6.3f}{cpu}")
    for r in results.get("http", []):
        label = f"HTTP {r['name']}" + (f" [{r['generator']} c={r['connections']}]" if r["connections"] else
                                       f" [{r['generator']} @{r['offered_rps']:.1f}/s]")
        ratio = f"{r['texts_per_s'] / reference:>6.3f}" if r["connections"] else " " * 6  # saturated runs only
        print(f"{label:<62} {r['texts_per_s']:>8.1f} {ratio} {r['throughput_rps']:>7.1f} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {str(r['ok']) + '/' + str(r['sent']):>12} "
              f"{r.get('goodput_rps', math.nan):>7.1f} {r['cache_hit_rate']:>5.2f} {r['texts_per_batch']:>7.1f} "
              f"{r['generator_cpu_share']:>8.1%}  {r['errors'] or ('-' if not r['failed'] else r['statuses'])}")
    print(f"ratio: engine rows x (a) by wall time (by process CPU time in brackets); saturated HTTP rows x the best "
          f"engine {ENGINE_REFERENCE!r} texts/s (one pass at a time, or the server's worker layout).\nTargets: (b) 32 >= 0.97, (c) >= 0.80; "
          "HTTP saturated >= 0.85 at 1 text/request, "
          f">= 0.95 at 16; open-loop p99 within the {SLO_SECONDS * 1e3:.0f} ms SLO. "
          "gen CPU: load generator CPU time / wall time.")
    if "http_error" in results:
        print(f"HTTP runs skipped: {results['http_error']}")
    print(f"one head solve (all task heads fused): {results['solve_ms']['wall']:.2f} ms wall, "
          f"{results['solve_ms']['cpu']:.2f} ms CPU (target <= 3 ms)")


ENGINE_REFERENCE = "(b) 32 distinct cached preferences"


def run_benchmark(bundle: Path | None, *, batch_size: int, batches: int, http_seconds: float, out: Path | None,
                  solve_dtype: str = "float64", generator: str = "auto", connections: int = 0,
                  server_log: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Run every case, print the table, optionally write JSON; returns the results (`http_error` when the
    server could not be started)."""
    tune_malloc()  # the engine with the server's allocator setting: the same work per text on both sides
    with tempfile.TemporaryDirectory(prefix="reprmerge-bench-") as tmp:
        bundle = bundle or synthetic_bundle(Path(tmp) / "bundle")
        engine = Engine.load(bundle, device=device, solve_dtype=solve_dtype, trace=True)  # as the server does
        texts = suite_texts(engine.tasks, 4096, seed=5)
        known = [t for t in engine.tasks if t in TASK_NAMES] or list(SUITES["tiny"].tasks)
        print(f"engine cases: batch {batch_size}, {batches} rounds", flush=True)
        bench = EngineBench(engine, batch_size, batches, texts)
        speeds = bench.run()
        remerge = bench.remerge()
        ceiling = speeds["(a) backbone only"]["texts_per_s"]
        speeds["(d) re-merged model per preference"] = {"texts_per_s": remerge, "ratio_wall": remerge / ceiling,
                                                        "ratio_cpu": math.nan}
        layout = ServiceSettings(bundle=bundle, device=device)
        workers, threads = layout.inference_worker_count, layout.inference_thread_count
        if (workers, threads) != (1, torch.get_num_threads()):  # the engine as the server runs it, too
            rate = bench.parallel(ENGINE_REFERENCE, workers, threads)
            speeds[f"{ENGINE_REFERENCE}, {workers} workers x {threads} threads"] = {
                "texts_per_s": rate, "ratio_wall": rate / ceiling, "ratio_cpu": math.nan}
        solve_wall, solve_cpu = bench.solve_ms()
        parts = bench.components()
        print("parts of one batch, each timed alone (ms; ratio = backbone / (backbone + part), no overlap credit):")
        for name, ms in parts.items():
            ratio = "" if name == "backbone" else f"   ratio {parts['backbone'] / (parts['backbone'] + ms):.3f}"
            print(f"  {name:<24} {ms:>9.2f}{ratio}")
        results: dict[str, Any] = {
            "batch_size": batch_size, "device": device, "threads": torch.get_num_threads(),
            "dim": engine.folder.solver.dim_,
            "tasks": len(engine.tasks), "classes": engine.folder.bias.numel(), "solve_dtype": solve_dtype,
            "text_source": ", ".join(known), "median_text_words": statistics.median(len(t.split()) for t in texts),
            "solve_ms": {"wall": solve_wall, "cpu": solve_cpu}, "engine": speeds, "parts_ms": parts,
            "load_generator": "wrk" if generator == "wrk" or (generator == "auto" and wrk_available()) else "python",
        }
        tasks = engine.tasks
        del bench, engine  # the server gets the machine
        if http_seconds > 0:
            print(f"HTTP: {http_seconds:g} s per run", flush=True)
            try:
                results["http"] = http_bench(Path(bundle), tasks, texts, batch_size=batch_size, seconds=http_seconds,
                                             generator=generator, connections=connections, server_log=server_log,
                                             device=device)
            except (RuntimeError, TimeoutError) as e:  # the server did not start: its log is kept and named
                results["http_error"] = str(e)
                print(f"HTTP runs skipped: {e}")
    print_table(results)
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    return results
