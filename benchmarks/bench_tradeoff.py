"""Time of /v1/tradeoff's closed-form losses: the G = W^T W form against the literal per-task form.

The literal form evaluates tr(W_p A_t W_p^T) per (preference, task) pair and the prior term through a
(P, T, d, d) difference tensor, O(P T d^3); the solver forms G_p = W_p^T W_p once and takes inner
products, O(P d^3 + P T d^2). Prints both times (median, float64, this CPU) and their largest
relative difference.

    python benchmarks/bench_tradeoff.py [--prefs 16] [--tasks 6] [--dim 384]
"""

from __future__ import annotations

import argparse

import torch
from bench_solve import synthetic_statistics, timed

from reprmerge_core.correction import CorrectionSolver


def literal_tradeoff(solver: CorrectionSolver, prefs: torch.Tensor) -> torch.Tensor:
    """The losses as the formula reads (the solver's form before it used G = W^T W)."""
    W = solver.solve(prefs).to(torch.float64)
    quad = torch.einsum("pij,tjk,pik->pt", W, solver.A_, W)
    cross = torch.einsum("pij,tij->pt", W, solver.B_)
    prior = ((W.unsqueeze(1) - solver.O_.unsqueeze(0)) ** 2).sum(dim=(-1, -2))
    return quad - 2 * cross + solver.e_ + solver.beta * prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefs", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    solver = CorrectionSolver(beta=0.3).fit(synthetic_statistics(args.dim, args.tasks, "cpu"))
    prefs = torch.rand(args.prefs, args.tasks, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    literal, fast = literal_tradeoff(solver, prefs), solver.tradeoff(prefs)
    rel = ((fast - literal).abs() / literal.abs()).max().item()
    t_literal = timed(lambda: literal_tradeoff(solver, prefs), "cpu", args.repeats)
    t_fast = timed(lambda: solver.tradeoff(prefs), "cpu", args.repeats)
    t_solve = timed(lambda: solver.solve(prefs), "cpu", args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, P = {args.prefs}, T = {args.tasks}, "
          f"d = {args.dim}")
    print(f"solve W_p alone    {t_solve * 1e3:8.1f} ms")
    print(f"literal tradeoff   {t_literal * 1e3:8.1f} ms")
    print(f"G = W^T W tradeoff {t_fast * 1e3:8.1f} ms   ({t_literal / t_fast:.1f}x faster)")
    print(f"largest relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
