"""Time of closed-form preference solves against their flop count.

For d in {384, 768, 1024} and T in {2, 8, 32}: one W_p solve, a batch of 64 solves, and the fused-head
fold that serving uses (4 classes per task, W_p never formed), in float64 on this machine's CPU
(or CUDA with --device cuda). Prints a table; GFLOP/s shows how close each is to the hardware.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768, 1024])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, float64")
    header = (f"{'d':>5} {'T':>3} | {'fit s':>6} | {'1 solve ms':>10} {'GFLOP/s':>7} | {'64 solves ms':>12} {'per solve':>9} "
              f"{'GFLOP/s':>7} | {'1 fold ms':>9} {'GFLOP/s':>7} | {'64 folds ms':>11}")
    print(header)
    print("-" * len(header))
    for d in args.dims:
        for T in args.tasks:
            stats = synthetic_statistics(d, T, args.device)
            start = time.perf_counter()
            solver = CorrectionSolver(beta=0.3, device=args.device).fit(stats)
            fit_s = time.perf_counter() - start
            g = torch.Generator().manual_seed(0)
            heads = [TaskHead(torch.randn(CLASSES_PER_TASK, d, generator=g), torch.zeros(CLASSES_PER_TASK)) for _ in range(T)]
            folder = HeadFolder(solver, heads)
            one = torch.rand(1, T, generator=g, dtype=torch.float64)
            many = torch.rand(args.batch, T, generator=g, dtype=torch.float64)
            t1 = timed(lambda: solver.solve(one), args.device, args.repeats)
            tb = timed(lambda: solver.solve(many), args.device, max(1, args.repeats // 2))
            f1 = timed(lambda: folder.fold(one), args.device, args.repeats)
            fb = timed(lambda: folder.fold(many), args.device, max(1, args.repeats // 2))
            sf, ff = solve_flops(d, T), fold_flops(d, T, CLASSES_PER_TASK * T)
            print(f"{d:>5} {T:>3} | {fit_s:>6.2f} | {t1 * 1e3:>10.2f} {sf / t1 / 1e9:>7.1f} | {tb * 1e3:>12.1f} "
                  f"{tb / args.batch * 1e3:>7.2f}ms {args.batch * sf / tb / 1e9:>7.1f} | {f1 * 1e3:>9.2f} {ff / f1 / 1e9:>7.1f} | "
                  f"{fb * 1e3:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
