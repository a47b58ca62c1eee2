"""Time of closed-form preference solves against their flop count, and what fresh preferences cost a server.

Synthetic table: for d in {384, 768, 1024} and T in {2, 8, 32}: one W_p solve, a batch of 64 solves, and
the fused-head fold that serving uses (4 classes per task, W_p never formed), in float64 (or --dtype float32)
on this machine's CPU (or CUDA with --device cuda); GFLOP/s shows how close each is to the hardware.

With --bundle (real bundles): engine case (c) of `reprmerge bench serve` (a new preference in every
request) against case (a) (backbone only) with solves in float64 and in float32 (with its float64 fallback),
the three run interleaved round by round so that a shared CPU's drift hits them alike; the CPU time of a
fold of one batch of new preferences; and with --agreement, how often float32 and float64 heads predict
the same class on the bundle suite's test sets.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from reprmerge_core.correction import CorrectionSolver, HeadFolder, TaskHead, TaskStatistics

CLASSES_PER_TASK = 4


def synthetic_statistics(d: int, T: int, device: str) -> list[TaskStatistics]:
    """PSD A_t and cross moments B_t of realistic conditioning, cheap to make at large d."""
    g = torch.Generator().manual_seed(d)
    X = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    A = X @ X.T
    B = (torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)) @ A
    return [TaskStatistics((A + t * 0.01 * torch.eye(d, dtype=torch.float64)).to(device),
                           (B + t * 0.01 * torch.eye(d, dtype=torch.float64)).to(device), 2 * d, float(torch.trace(A)))
            for t in range(T)]


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time in seconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def solve_flops(d: int, T: int) -> float:
    """Aggregate sum p_t M_t and sum p_t C_t (4 T d^2), Cholesky (d^3/3), solve with d right-hand sides (2 d^3)."""
    return 4 * T * d**2 + d**3 / 3 + 2 * d**3


def fold_flops(d: int, T: int, K: int) -> float:
    """Aggregate C (2 T d^2) and H M (2 T K d), Cholesky (d^3/3), solve with K right-hand sides (2 K d^2)."""
    return 2 * T * d**2 + 2 * T * K * d + d**3 / 3 + 2 * K * d**2


def engine_ratios(bundle: Path, batch_size: int, rounds: int) -> None:
    """Cases (a), (c) float64 and (c) float32, interleaved; paired per-round ratios to (a), medians.

    Case (c) as `reprmerge bench serve` runs it overlaps the fold (heads thread) with the forward; the
    last row instead folds first, its chunks spread over 2 single-threaded workers, then runs the forward:
    the schedule for a box with no core to spare.
    """
    from reprmerge_bench.serve import EngineBench, suite_texts
    from service.engine import Engine, Head

    engines = {dtype: Engine.load(bundle, device="cpu", solve_dtype=dtype) for dtype in ("float64", "float32")}
    texts = suite_texts(engines["float64"].tasks, 4096, seed=5)
    benches = {dtype: EngineBench(engine, batch_size, rounds, texts) for dtype, engine in engines.items()}
    steps: dict[str, Callable[[list[str]], object]] = {"(a) backbone only": benches["float64"].engine.encode}
    for dtype, bench in benches.items():
        steps[f"(c) new preference per request, {dtype}"] = bench.cases(distinct=(1,))["(c) new preference per request"]
    workers = ThreadPoolExecutor(2, thread_name_prefix="fold", initializer=torch.set_num_threads, initargs=(1,))
    fast = benches["float32"]

    def fold_first(texts: list[str]) -> None:
        prefs = fast._fresh(len(texts))
        weights = torch.tensor([p.weights for p in prefs], dtype=torch.float64)
        fused = fast.engine.folder.fold(weights, workers)
        heads = {p.fingerprint: Head(p.fingerprint, fused.weight[i].clone()) for i, p in enumerate(prefs)}
        fast._apply(fast.engine.encode(texts), prefs, heads)

    steps["(c) float32, fold first on 2 workers"] = fold_first
    batches = benches["float64"].texts
    walls: dict[str, list[float]] = {name: [] for name in steps}
    cpus: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(batches[0])
    for r in range(rounds):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step(batches[r])
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    a = "(a) backbone only"
    print(f"\n{bundle}: batch {batch_size}, {rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'case':<45} {'texts/s':>8} {'x (a) wall':>10} {'x (a) CPU':>10}")
    for name in steps:
        ratio_wall = statistics.median(x / y for x, y in zip(walls[a], walls[name], strict=True))
        ratio_cpu = statistics.median(x / y for x, y in zip(cpus[a], cpus[name], strict=True))
        print(f"{name:<45} {batch_size / statistics.median(walls[name]):>8.1f} {ratio_wall:>10.3f} {ratio_cpu:>10.3f}")
    for dtype, bench in benches.items():
        def fold_cpu_ms(bench: EngineBench = bench) -> float:
            prefs = bench._fresh(batch_size)
            start = time.thread_time()
            bench.engine.fold(prefs)
            return 1e3 * (time.thread_time() - start)

        ms = [bench.heads_thread.submit(fold_cpu_ms).result() for _ in range(max(rounds, 5))]
        print(f"fold of {batch_size} new preferences, {dtype}: {statistics.median(ms):.1f} ms CPU (median)")


def agreement(bundle: Path, batch_size: int) -> None:
    """float32 vs float64 heads on the suite's test sets: same predicted class, worst weight error."""
    from reprmerge_core.bundle import load_bundle
    from reprmerge_core.data import load_suite
    from reprmerge_core.evaluation.metrics import simplex_grid
    from reprmerge_core.pipeline.build import suite_from_extra
    from service.engine import Engine

    loaded = load_bundle(bundle)
    suite, _ = suite_from_extra(loaded.manifest.extra)
    splits = load_suite(suite)
    engine = Engine.load(bundle, device="cpu", solve_dtype="float64")
    T = len(splits)
    g = torch.Generator().manual_seed(0)
    prefs = torch.cat([torch.from_numpy(simplex_grid(T, 4 if T <= 3 else 2)),
                       -torch.log(torch.rand(64, T, generator=g, dtype=torch.float64))])
    solver64 = engine.folder.solver
    solver32 = solver64.with_dtype(torch.float32)
    w64 = HeadFolder(solver64, loaded.heads, out_dtype=torch.float64).fold(prefs).weight
    w32 = HeadFolder(solver32, loaded.heads, out_dtype=torch.float64).fold(prefs).weight
    fallback = int((solver32.condition_bound(prefs) > solver32.max_float32_condition).sum())
    rel = ((w32 - w64).norm(dim=(-1, -2)) / w64.norm(dim=(-1, -2))).max().item()
    print(f"\n{bundle}: {len(prefs)} preferences ({fallback} solved in float64 by the guard), "
          f"condition bound max {solver32.condition_bound(prefs).max().item():.0f}, "
          f"worst relative error of float32 heads {rel:.1e}")
    slices = engine.folder.slices
    total_same = total = 0
    for t, split in enumerate(splits):
        texts = list(split.test.texts)
        z = torch.cat([engine.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]).double()
        s = slices[t]
        p64 = (z @ w64[:, s].transpose(-1, -2)).argmax(-1)  # (P, n); the bias does not change with the precision
        p32 = (z @ w32[:, s].transpose(-1, -2)).argmax(-1)
        same = int((p64 == p32).sum())
        total_same, total = total_same + same, total + p64.numel()
        print(f"  {split.name:<20} {len(texts):>5} test texts x {len(prefs)} preferences: "
              f"{same}/{p64.numel()} same predictions ({same / p64.numel():.6f})")
    print(f"  all tasks: {total_same}/{total} ({total_same / total:.6f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1024])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="synthetic table: solve precision")
    parser.add_argument("--bundle", type=Path, nargs="*", default=[], help="real bundles: engine cases (a) vs (c)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch with --bundle")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds with --bundle")
    parser.add_argument("--agreement", action="store_true", help="with --bundle: float32 vs float64 predictions")
    args = parser.parse_args()
    if args.bundle:
        for bundle in args.bundle:
            engine_ratios(bundle, args.batch_size, args.rounds)
            if args.agreement:
                agreement(bundle, args.batch_size)
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, {args.dtype}")
    header = (f"{'d':>5} {'T':>3} | {'fit s':>6} | {'1 solve ms':>10} {'GFLOP/s':>7} | {'64 solves ms':>12} "
              f"{'per solve':>9} {'GFLOP/s':>7} | {'1 fold ms':>9} {'GFLOP/s':>7} | {'64 folds ms':>11}")
    print(header)
    print("-" * len(header))
    for d in args.dims:
        for T in args.tasks:
            stats = synthetic_statistics(d, T, args.device)
            start = time.perf_counter()
            solver = CorrectionSolver(beta=0.3, device=args.device, dtype=getattr(torch, args.dtype)).fit(stats)
            fit_s = time.perf_counter() - start
            g = torch.Generator().manual_seed(0)
            heads = [TaskHead(torch.randn(CLASSES_PER_TASK, d, generator=g),
                              torch.zeros(CLASSES_PER_TASK)) for _ in range(T)]
            folder = HeadFolder(solver, heads)
            one = torch.rand(1, T, generator=g, dtype=torch.float64)
            many = torch.rand(args.batch, T, generator=g, dtype=torch.float64)
            # timed() calls each function at once, inside this iteration: late binding cannot pick up the next d
            t1 = timed(functools.partial(solver.solve, one), args.device, args.repeats)
            tb = timed(functools.partial(solver.solve, many), args.device, max(1, args.repeats // 2))
            f1 = timed(functools.partial(folder.fold, one), args.device, args.repeats)
            fb = timed(functools.partial(folder.fold, many), args.device, max(1, args.repeats // 2))
            sf, ff = solve_flops(d, T), fold_flops(d, T, CLASSES_PER_TASK * T)
            print(f"{d:>5} {T:>3} | {fit_s:>6.2f} | {t1 * 1e3:>10.2f} {sf / t1 / 1e9:>7.1f} | {tb * 1e3:>12.1f} "
                  f"{tb / args.batch * 1e3:>7.2f}ms {args.batch * sf / tb / 1e9:>7.1f} | {f1 * 1e3:>9.2f} "
                  f"{ff / f1 / 1e9:>7.1f} | {fb * 1e3:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
