"""Merge methods against independent references: PEFT's merge utilities, brute-force least squares,
the RegMean formula in numpy, and a hand-propagated two-layer network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft
from torch import Tensor, nn
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import BertModel

from reprmerge_core.merging import METHODS, collect_grams, diagnose, layer_stages, merge_sequential, merge_state_dicts
from reprmerge_core.merging.diagnostics import diagnose_experts, task_vector_norm
from reprmerge_core.merging.merge import parameter_seed
from reprmerge_core.merging.projection import (
    calibration_loss,
    diagonal_qp,
    eigen_qp,
    residual_energy,
    residual_energy_matrix,
)

F64 = torch.float64


def random_state(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {
        "lin.weight": torch.randn(6, 5, generator=gen, dtype=dtype),
        "lin.bias": torch.randn(6, generator=gen, dtype=dtype),
        "norm.weight": 1 + 0.1 * torch.randn(5, generator=gen, dtype=dtype),
        "emb.weight": torch.randn(11, 5, generator=gen, dtype=dtype),
    }


def make_experts(
    base: dict[str, Tensor], gen: torch.Generator, k: int, frozen: tuple[str, ...] = ("emb.weight",)
) -> dict[str, dict[str, Tensor]]:
    """Experts = base + random task vectors; `frozen` parameters stay at the base (as frozen embeddings)."""
    return {
        f"t{i}": {
            n: v if n in frozen else v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for n, v in base.items()
        }
        for i in range(k)
    }


DATA_FREE = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.2}),
    ("dare", {"drop_rate": 0.5, "seed": 3}),
    ("dare", {"drop_rate": 0.5, "combine": "ties"}),
]


@pytest.mark.parametrize(("method", "params"), DATA_FREE)
def test_lambda_zero_is_the_base(method: str, params: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    base = random_state(gen)
    result = merge_state_dicts(base, make_experts(base, gen, 3), method, {**params, "lambda": 0.0})
    assert all(torch.equal(result.state_dict[n], base[n]) for n in base)


@pytest.mark.parametrize(
    ("method", "params"), [("task_arithmetic", {}), ("ties", {"density": 1.0}), ("dare", {"drop_rate": 0.0})]
)
def test_one_expert_lambda_one_is_the_expert(method: str, params: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    base = random_state(gen)
    experts = make_experts(base, gen, 1)
    result = merge_state_dicts(base, experts, method, {**params, "lam": 1.0})
    assert all(torch.equal(result.state_dict[n], experts["t0"][n]) for n in base)


def test_unchanged_and_frozen_parameters_stay_bit_exact() -> None:
    gen = torch.Generator().manual_seed(2)
    base = random_state(gen)
    result = merge_state_dicts(base, make_experts(base, gen, 3), "ties", {"freeze": ["norm.*"]})
    assert result.state_dict["emb.weight"] is base["emb.weight"]  # no expert changed it
    assert torch.equal(result.state_dict["norm.weight"], base["norm.weight"])  # frozen by pattern
    assert sorted(result.report.base_parameters) == ["emb.weight", "norm.weight"]
    assert not torch.equal(result.state_dict["lin.weight"], base["lin.weight"])


def peft_merged(
    base: dict[str, Tensor], experts: dict[str, dict[str, Tensor]], fn, lam: float, **kwargs
) -> dict[str, Tensor]:
    weights = torch.full((len(experts),), lam, dtype=F64)
    return {n: base[n] + fn([e[n] - base[n] for e in experts.values()], weights, **kwargs) for n in base}


def assert_states_close(ours: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-12, msg=name)


def test_task_arithmetic_and_ties_match_peft() -> None:
    gen = torch.Generator().manual_seed(3)
    base = random_state(gen, F64)
    experts = make_experts(base, gen, 3, frozen=())
    ours = merge_state_dicts(base, experts, "task_arithmetic", {"lam": 0.4}).state_dict
    assert_states_close(ours, peft_merged(base, experts, peft.task_arithmetic, 0.4))
    # our density is PEFT's density: the kept fraction, k = int(density * numel)
    ours = merge_state_dicts(base, experts, "ties", {"density": 0.3, "lam": 0.8}).state_dict
    assert_states_close(ours, peft_merged(base, experts, peft.ties, 0.8, density=0.3, majority_sign_method="total"))


@pytest.mark.parametrize(("combine", "peft_fn"), [("linear", peft.dare_linear), ("ties", peft.dare_ties)])
def test_dare_matches_peft_with_the_same_mask(combine: str, peft_fn) -> None:
    # PEFT draws each task's mask as bernoulli(full_like(tau_k, density)) from the global RNG, task by task.
    # We draw the same calls, in the same order, from a generator seeded with parameter_seed(seed, name);
    # seeding the global RNG with that number before PEFT's call therefore reproduces our masks exactly.
    gen = torch.Generator().manual_seed(4)
    base = random_state(gen, F64)
    experts = make_experts(base, gen, 3, frozen=())
    ours = merge_state_dicts(
        base, experts, "dare", {"drop_rate": 0.3, "lam": 0.6, "seed": 7, "combine": combine}
    ).state_dict
    for name in base:
        torch.manual_seed(parameter_seed(7, name))
        reference = base[name] + peft_fn(
            [e[name] - base[name] for e in experts.values()], torch.full((3,), 0.6, dtype=F64), density=0.7
        )
        torch.testing.assert_close(ours[name], reference, rtol=0, atol=1e-12, msg=name)


def test_dare_drop_statistics_and_seed() -> None:
    base = {"w": torch.zeros(200, 200, dtype=F64)}
    experts = {"a": {"w": torch.ones(200, 200, dtype=F64)}}
    out = merge_state_dicts(base, experts, "dare", {"drop_rate": 0.25, "lam": 1.0, "seed": 1}).state_dict["w"]
    assert set(out.unique().tolist()) == {0.0, 1 / 0.75}  # survivors rescaled by 1 / (1 - p)
    assert abs(float((out == 0).double().mean()) - 0.25) < 0.01
    assert abs(float(out.mean()) - 1.0) < 0.02  # unbiased
    again = merge_state_dicts(base, experts, "dare", {"drop_rate": 0.25, "lam": 1.0, "seed": 1}).state_dict["w"]
    other = merge_state_dicts(base, experts, "dare", {"drop_rate": 0.25, "lam": 1.0, "seed": 2}).state_dict["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("ties", {"density": 1.5}, "density"),
        ("dare", {"drop_rate": 1.0}, "drop_rate"),
        ("task_arithmetic", {"lamda": 1}, "lamda"),
        ("projection", {"rank": 2}, "rank"),
        ("regmean", {"alpha": -1}, "alpha"),
        ("breadcrumbs", {"density": 0.995, "gamma": 0.01}, "density \\+ gamma"),
    ],
)
def test_bad_parameters_name_the_field(method: str, params: dict, field: str) -> None:
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=field):
        merge_state_dicts(base, {"a": {"w": torch.ones(2, 2)}}, method, params, grams={"a": {}})


def test_incompatible_state_dicts_name_the_parameter() -> None:
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"parameter w: base shape \(2, 2\) vs expert 'a' shape \(3, 2\)"):
        merge_state_dicts(base, {"a": {"w": torch.ones(3, 2), "b": torch.zeros(2)}}, "task_arithmetic")


GOLDEN = Path(__file__).parent / "data" / "merge_golden.safetensors"
GOLDEN_CASES = {
    "task_arithmetic": ("task_arithmetic", {"lam": 0.4}),
    "ties": ("ties", {"density": 0.3, "lam": 0.8}),
    "dare_linear": ("dare", {"drop_rate": 0.3, "lam": 0.6, "seed": 7}),
    "dare_ties": ("dare", {"drop_rate": 0.3, "lam": 0.6, "seed": 7, "combine": "ties"}),
    "regmean": ("regmean", {"alpha": 0.9}),
    "projection": ("projection", {}),
    "projection_eigen": ("projection", {"basis": "eigen", "rank": 4}),
}


def golden_inputs() -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """The float32 base, 3 experts (embeddings frozen) and per-task Grams of `lin` the golden file was made from."""
    gen = torch.Generator().manual_seed(11)
    base = random_state(gen)
    experts = make_experts(base, gen, 3)
    grams = {}
    for task in experts:
        x = torch.randn(5, 40, generator=gen, dtype=F64)
        grams[task] = {"lin": x @ x.T}
    return base, experts, grams


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_registry_reproduces_the_previous_methods_bit_for_bit(case: str) -> None:
    # tests/data/merge_golden.safetensors holds merge_state_dicts' outputs from main at 0f1387d, before the
    # methods became sparsifier + consensus compositions; every result must be identical, not just close.
    method, params = GOLDEN_CASES[case]
    base, experts, grams = golden_inputs()
    merged = merge_state_dicts(base, experts, method, params, grams if METHODS[method].data_aware else None)
    golden = load_file(GOLDEN)
    for name in base:
        assert torch.equal(merged.state_dict[name], golden[f"{case}/{name}"]), name


def test_preference_weighted_task_arithmetic_is_the_registry_call() -> None:
    # The paper's baseline (theta_0 + sum_t p_t tau_t), formerly evaluation.weighted_task_arithmetic, saved from main.
    base, experts, _ = golden_inputs()
    p = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    merged = merge_state_dicts(base, experts, "task_arithmetic", {"lam": 1.0}, weights=p)
    golden = load_file(GOLDEN)
    for name in base:
        assert torch.equal(merged.state_dict[name], golden[f"weighted_task_arithmetic/{name}"]), name
    assert merged.report.weights == p and merged.report.params == {"freeze": [], "lam": 1.0}


@pytest.mark.parametrize(
    ("method", "params", "peft_fn", "kwargs"),
    [
        ("task_arithmetic", {"lam": 0.7}, peft.task_arithmetic, {}),
        ("ties", {"density": 0.4, "lam": 0.9}, peft.ties, {"density": 0.4, "majority_sign_method": "total"}),
        ("dare", {"drop_rate": 0.3, "lam": 0.5, "seed": 2}, peft.dare_linear, {"density": 0.7}),
        ("dare", {"drop_rate": 0.3, "lam": 0.5, "seed": 2, "combine": "ties"}, peft.dare_ties, {"density": 0.7}),
    ],
)
def test_per_expert_weights_match_peft(method: str, params: dict, peft_fn, kwargs: dict) -> None:
    # PEFT takes one weight per task vector; ours is weight_k * lam.
    gen = torch.Generator().manual_seed(5)
    base = random_state(gen, F64)
    experts = make_experts(base, gen, 3, frozen=())
    weights = {"t0": 1.5, "t1": -0.5, "t2": 0.25}
    ours = merge_state_dicts(base, experts, method, params, weights=weights).state_dict
    scaled = torch.tensor([w * params["lam"] for w in weights.values()], dtype=F64)
    for name in base:
        torch.manual_seed(parameter_seed(params.get("seed", 0), name))  # DARE: the same masks (see above)
        reference = base[name] + peft_fn([e[name] - base[name] for e in experts.values()], scaled, **kwargs)
        torch.testing.assert_close(ours[name], reference, rtol=0, atol=1e-12, msg=name)


def breadcrumbs_reference(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Entries whose magnitude rank (numpy, ascending) lies in [n - top - keep, n - top)."""
    flat = delta.reshape(-1).numpy()
    n = flat.size
    keep, top = int(density * n), int(gamma * n)
    rank = np.empty(n, dtype=int)
    rank[np.argsort(np.abs(flat), kind="stable")] = np.arange(n)
    mask = (rank >= n - top - keep) & (rank < n - top)
    return torch.from_numpy(np.where(mask, flat, 0.0)).reshape(delta.shape)


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_breadcrumbs_drops_outliers_and_the_smallest(combine: str) -> None:
    gen = torch.Generator().manual_seed(6)
    base = random_state(gen, F64)
    experts = make_experts(base, gen, 3, frozen=())
    weights = {"t0": 1.0, "t1": 2.0, "t2": 0.5}
    params = {"density": 0.5, "gamma": 0.1, "lam": 0.7, "combine": combine}
    ours = merge_state_dicts(base, experts, "breadcrumbs", params, weights=weights).state_dict
    w = torch.tensor(list(weights.values()), dtype=F64)
    for name in base:
        pruned = torch.stack([breadcrumbs_reference(e[name] - base[name], 0.5, 0.1) for e in experts.values()])
        weighted = pruned * w.view(-1, *[1] * base[name].ndim)
        if combine == "ties":  # PEFT's order: signs elected on the unweighted vectors
            update = 0.7 * peft.disjoint_merge(weighted, peft.calculate_majority_sign_mask(pruned, "total"))
        else:
            update = 0.7 * weighted.sum(0)
        torch.testing.assert_close(ours[name], base[name] + update, rtol=0, atol=1e-12, msg=name)
    # lin.weight has 30 entries: 15 kept, the 3 largest dropped
    kept = breadcrumbs_reference(experts["t0"]["lin.weight"] - base["lin.weight"], 0.5, 0.1)
    assert int((kept != 0).sum()) == 15


@pytest.mark.parametrize(
    ("method", "weights", "message"),
    [
        ("ties", {"t9": 1.0}, r"unknown experts \['t9'\]"),
        ("ties", {"t0": float("nan")}, "finite"),
        ("regmean", {"t0": 2.0}, "data-free methods, not to 'regmean'"),
    ],
)
def test_bad_weights_are_refused(method: str, weights: dict, message: str) -> None:
    base, experts, grams = golden_inputs()
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(base, experts, method, {}, grams, weights=weights)


# ---- one linear layer: output-space projection and RegMean ----


def layer_problem(seed: int, k: int = 3, m: int = 4, n: int = 5, samples: int = 7, duplicate: bool = False):
    """Task updates (K, m, n), calibration inputs X_k (n, s) and their Grams; correlated inputs per task."""
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, m, n, generator=gen, dtype=F64)
    if duplicate:
        deltas[1] = deltas[0]
    inputs = [
        torch.randn(n, n, generator=gen, dtype=F64) @ torch.randn(n, samples, generator=gen, dtype=F64)
        for _ in range(k)
    ]
    grams = torch.stack([x @ x.T for x in inputs])
    return deltas, inputs, grams


def explicit_loss(update: Tensor, deltas: Tensor, inputs: list[Tensor]) -> float:
    """sum_k ||U X_k - Delta_k X_k||^2 from the outputs themselves."""
    return sum(float(((update - d) @ x).pow(2).sum()) for d, x in zip(deltas, inputs))


def brute_force(basis: list[Tensor], deltas: Tensor, inputs: list[Tensor]) -> tuple[Tensor, float]:
    """Least squares over the basis coefficients with explicit outputs (numpy lstsq)."""
    design = np.stack([np.concatenate([(b @ x).numpy().ravel() for x in inputs]) for b in basis], axis=1)
    target = np.concatenate([(d @ x).numpy().ravel() for d, x in zip(deltas, inputs)])
    coef = np.linalg.lstsq(design, target, rcond=None)[0]
    update = sum(c * b for c, b in zip(coef.tolist(), basis))
    return update, explicit_loss(update, deltas, inputs)


def diagonal_basis(deltas: Tensor) -> list[Tensor]:
    k, m, _ = deltas.shape
    return [torch.diag_embed(torch.eye(m, dtype=F64)[i]) @ deltas[j] for j in range(k) for i in range(m)]


@pytest.mark.parametrize("duplicate", [False, True])
def test_diagonal_qp_equals_brute_force_least_squares(duplicate: bool) -> None:
    deltas, inputs, grams = layer_problem(5, duplicate=duplicate)  # duplicate: every G_i is singular
    solution = diagonal_qp(deltas, grams)
    update, loss = brute_force(diagonal_basis(deltas), deltas, inputs)
    assert explicit_loss(solution.update, deltas, inputs) == pytest.approx(loss, rel=1e-8)
    if not duplicate:  # with two equal tasks only the sum of their coefficients is identified
        torch.testing.assert_close(solution.update, update, rtol=1e-7, atol=1e-9)


def test_diagonal_qp_beats_averaging_and_task_arithmetic() -> None:
    for seed in range(5):
        deltas, _, grams = layer_problem(seed)
        loss = calibration_loss(diagonal_qp(deltas, grams).update, deltas, grams)
        for lam in (1 / 3, 0.1, 0.3, 0.5, 1.0):
            assert loss <= calibration_loss(lam * deltas.sum(0), deltas, grams) + 1e-9


def test_rho_and_optimal_loss() -> None:
    deltas, inputs, grams = layer_problem(6)
    energy = residual_energy(deltas, grams)
    assert energy == pytest.approx(sum(float((d @ x).pow(2).sum()) for d, x in zip(deltas, inputs)))
    for solution in (diagonal_qp(deltas, grams), eigen_qp(deltas, grams), eigen_qp(deltas, grams, rank=2)):
        rho = solution.captured / energy
        assert 0.0 <= rho <= 1.0
        assert explicit_loss(solution.update, deltas, inputs) == pytest.approx((1 - rho) * energy, rel=1e-8)


def test_eigen_basis_from_grams_equals_explicit_outputs_and_brute_force() -> None:
    deltas, inputs, grams = layer_problem(7)
    energy_matrix = sum((d @ x) @ (d @ x).T for d, x in zip(deltas, inputs))
    torch.testing.assert_close(residual_energy_matrix(deltas, grams), energy_matrix)
    _, vectors = torch.linalg.eigh(energy_matrix)
    top = vectors[:, -2:]
    basis = [torch.outer(top[:, b], top[:, b]) @ d for d in deltas for b in range(2)]
    _, loss = brute_force(basis, deltas, inputs)
    assert explicit_loss(eigen_qp(deltas, grams, rank=2).update, deltas, inputs) == pytest.approx(loss, rel=1e-8)


def test_regmean_equals_the_formula_and_is_the_unrestricted_optimum() -> None:
    gen = torch.Generator().manual_seed(8)
    base = {"lin.weight": torch.randn(4, 5, generator=gen, dtype=F64)}
    deltas, _, grams = layer_problem(8, samples=9)
    experts = {f"t{k}": {"lin.weight": base["lin.weight"] + deltas[k]} for k in range(3)}
    per_task = {f"t{k}": {"lin": grams[k]} for k in range(3)}
    alpha = 0.7
    merged = merge_state_dicts(base, experts, "regmean", {"alpha": alpha, "ridge": 0.0}, per_task).state_dict[
        "lin.weight"
    ]
    shrunk = [alpha * g.numpy() + (1 - alpha) * np.diag(np.diag(g.numpy())) for g in grams]
    numerator = sum(e["lin.weight"].numpy() @ s for e, s in zip(experts.values(), shrunk))
    reference = numerator @ np.linalg.inv(sum(shrunk))
    np.testing.assert_allclose(merged.numpy(), reference, rtol=1e-9, atol=1e-10)
    exact = merge_state_dicts(base, experts, "regmean", {"alpha": 1.0, "ridge": 0.0}, per_task).report
    qp = merge_state_dicts(base, experts, "projection", {}, per_task).report
    assert exact.layers["lin"].loss <= qp.layers["lin"].loss + 1e-9
    assert qp.layers["lin"].rho == pytest.approx(diagonal_qp(deltas, grams).captured / residual_energy(deltas, grams))


def test_data_aware_report_and_nonlinear_rule() -> None:
    gen = torch.Generator().manual_seed(9)
    base = random_state(gen, F64)
    experts = make_experts(base, gen, 2)
    grams = {t: {"lin": torch.eye(5, dtype=F64) * (i + 1)} for i, t in enumerate(experts)}
    result = merge_state_dicts(base, experts, "projection", {"basis": "eigen"}, grams)
    mean = {n: (experts["t0"][n] + experts["t1"][n]) / 2 for n in base}
    torch.testing.assert_close(result.state_dict["lin.bias"], mean["lin.bias"])  # lam None: the average
    assert torch.equal(result.state_dict["emb.weight"], base["emb.weight"])
    assert 0.0 <= result.report.rho <= 1.0 and set(result.report.layers) == {"lin"}
    again = diagnose(base, experts, result.state_dict, grams)["lin"]  # any merged state, measured afterwards
    assert again.loss == pytest.approx(result.report.layers["lin"].loss, rel=1e-12)
    with pytest.raises(ValueError, match="data-aware"):
        merge_state_dicts(base, experts, "regmean")


# ---- calibration Grams and the sequential variant ----


class TokenModel(nn.Module):
    """(B, T, n) inputs with an attention mask, like a transformer layer sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, input: Tensor, attention_mask: Tensor) -> Tensor:
        return self.lin(input)


def test_collect_grams_counts_only_real_tokens() -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    grams = collect_grams(TokenModel(), [{"input": x, "attention_mask": mask}], ["lin"])
    real = torch.cat([x[0, :3], x[1, :2]]).to(F64)
    torch.testing.assert_close(grams["lin"], real.T @ real)


def test_layer_stages_of_bert_group_shared_inputs(tiny_backbone_dir) -> None:
    model = BertModel.from_pretrained(tiny_backbone_dir)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    stages = layer_stages(model, batch, linear)
    prefix = "encoder.layer.0."
    assert stages[0] == [
        prefix + "attention.self.query",
        prefix + "attention.self.key",
        prefix + "attention.self.value",
    ]
    assert stages[1:4] == [
        [prefix + "attention.output.dense"],
        [prefix + "intermediate.dense"],
        [prefix + "output.dense"],
    ]
    assert stages[-1] == ["pooler.dense"] and len(stages) == 9


def test_bert_layer_inputs_are_the_embeddings_of_real_tokens(tiny_backbone_dir) -> None:
    model = BertModel.from_pretrained(tiny_backbone_dir)
    batch = {
        "input_ids": torch.tensor([[101, 2000, 2001, 102], [101, 2003, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    names = [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    grams = collect_grams(model, [batch], names)
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"])
    rows = hidden[batch["attention_mask"].bool()].to(F64)
    for name in names:  # one shared input, computed once and added to each
        torch.testing.assert_close(grams[name], rows.T @ rows)


def two_layer() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def regmean_numpy(weights: list[Tensor], grams: list[Tensor]) -> Tensor:
    numerator = sum(w.numpy() @ g.numpy() for w, g in zip(weights, grams))
    return torch.from_numpy(numerator @ np.linalg.inv(sum(g.numpy() for g in grams)))


def test_sequential_uses_merged_inputs_and_differs_from_one_shot() -> None:
    torch.manual_seed(11)
    model = two_layer()
    shared = model.state_dict()  # shares storage with the model that merge_sequential overwrites
    base = {n: v.clone() for n, v in shared.items()}
    experts = {t: {n: v + 0.3 * torch.randn_like(v) for n, v in base.items()} for t in ("a", "b")}
    inputs = {t: torch.randn(20, 4, dtype=F64) for t in experts}
    batches = {t: [{"input": x[:12]}, {"input": x[12:]}] for t, x in inputs.items()}
    params = {"alpha": 1.0, "ridge": 0.0}
    projection = merge_sequential(model, shared, experts, "projection", {"sequential": True}, batches).state_dict
    fresh = merge_sequential(two_layer(), base, experts, "projection", {"sequential": True}, batches).state_dict
    assert all(torch.equal(projection[n], fresh[n]) for n in fresh)  # sharing storage with the model is harmless
    result = merge_sequential(two_layer(), base, experts, "regmean", {**params, "sequential": True}, batches)

    # by hand: biases averaged; layer 1 from the raw inputs; layer 2 from the merged layer 1's outputs
    b1 = (experts["a"]["0.bias"] + experts["b"]["0.bias"]) / 2
    w1 = regmean_numpy([experts[t]["0.weight"] for t in experts], [inputs[t].T @ inputs[t] for t in experts])
    hidden = {t: torch.tanh(x @ w1.T + b1) for t, x in inputs.items()}
    w2 = regmean_numpy([experts[t]["2.weight"] for t in experts], [h.T @ h for h in hidden.values()])
    torch.testing.assert_close(result.state_dict["0.weight"], w1)
    torch.testing.assert_close(result.state_dict["2.weight"], w2)
    assert set(result.report.layers) == {"0", "2"} and result.report.rho is not None

    # one-shot: each expert's own activations at layer 2
    own = {}
    for t, state in experts.items():
        model = two_layer()
        model.load_state_dict(state)
        own[t] = collect_grams(model, batches[t], ["0", "2"])
    one_shot = merge_state_dicts(base, experts, "regmean", params, own).state_dict
    torch.testing.assert_close(one_shot["0.weight"], w1)
    assert float((one_shot["2.weight"] - w2).abs().max()) > 1e-3


def _trained_head(seed: int, classes: int, dim: int, gen: torch.Generator) -> Tensor:
    """A Linear head started from `seed` and moved 3% by training (issue 10 measured ~3% after one epoch)."""
    torch.manual_seed(seed)
    w = nn.Linear(dim, classes).weight.detach()
    return w + 0.03 * w.norm() / classes ** 0.5 * torch.randn(w.shape, generator=gen) / dim ** 0.5


def test_heads_from_one_seed_are_flagged_and_independent_heads_are_not() -> None:
    gen = torch.Generator().manual_seed(0)
    shared = {name: _trained_head(0, 2, 384, gen) for name in ("sms", "movie")}
    shared["trec"] = _trained_head(0, 6, 384, gen)
    own = {name: _trained_head(seed, c, 384, gen)
           for name, seed, c in (("sms", 100, 2), ("movie", 101, 2), ("trec", 102, 6))}
    bad, good = diagnose_experts(shared), diagnose_experts(own)
    by_pair = {p.tasks: p for p in bad.head_pairs}
    assert set(by_pair) == {("sms", "movie"), ("sms", "trec"), ("movie", "trec")}
    # binary heads: the class-direction cosine is the cosine of w1 - w0, computed here independently
    reference = F.cosine_similarity(shared["sms"][1] - shared["sms"][0], shared["movie"][1] - shared["movie"][0], dim=0)
    assert by_pair["sms", "movie"].direction_cosine == pytest.approx(float(reference), abs=1e-6) and reference > 0.99
    # a 6-class head from the same seed shares its first rows with the binary heads (one RNG stream)
    assert by_pair["sms", "trec"].direction_cosine is None and by_pair["sms", "trec"].max_row_cosine > 0.99
    assert all(p.aligned for p in bad.head_pairs) and len(bad.warnings) == 1
    assert "3 of 3 pairs" in bad.warnings[0] and "sms~movie" in bad.warnings[0] and "seed" in bad.warnings[0]
    assert not any(p.aligned for p in good.head_pairs) and good.warnings == []
    assert max(abs(p.max_row_cosine) for p in good.head_pairs) < 0.3
    assert bad.task_vector_norms is None and bad.norm_ratios == {}


def test_an_expert_far_from_the_base_is_flagged_against_its_peers() -> None:
    gen = torch.Generator().manual_seed(1)
    base = random_state(gen)
    base["position_ids"] = torch.arange(5)  # integer buffers are not weights
    scales = {"a": 1.0, "b": 1.3, "c": 0.8, "stray": 100.0}
    experts = {t: {k: v + s * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 1
                   for k, v in base.items()} for t, s in scales.items()}
    experts["a"]["extra.weight"] = torch.ones(3)  # a parameter the base lacks is not part of the task vector
    norms = {t: task_vector_norm(base, e) for t, e in experts.items()}
    deltas = [(experts["b"][k].double() - base[k].double()).flatten() for k in base if k != "position_ids"]
    reference = torch.cat(deltas).norm()
    assert norms["b"] == pytest.approx(float(reference), rel=1e-9)
    result = diagnose_experts({}, norms)
    assert result.norm_ratios["stray"] == pytest.approx(norms["stray"] / norms["a"], rel=1e-9)  # median of a, b, c
    assert result.norm_ratios["stray"] > 50 and max(r for t, r in result.norm_ratios.items() if t != "stray") < 2
    assert len(result.warnings) == 1 and "stray" in result.warnings[0] and " a " not in result.warnings[0]
    assert diagnose_experts({}, {"a": 1.0}).norm_ratios == {}  # no peers, no ratio
