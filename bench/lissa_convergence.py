"""Does LiSSA converge on a prepared bundle? (issue 13 item 3)

The curvature operator is the served one (GGN over the bundle's seeded curvature sample,
δ = damping_ratio · λ_max as the server resolves it), evaluated on the hidden states entering
the scope, cached once (the served operator does this itself since runtime.train_batch: the
frozen layers below the scope are constant, so H is the same; the relative difference to the
full-model product of the same bundle without the split, on one batch, is reported). The
served code path (solver_policy.solve_s_test, SOLVER_LISSA with no options) runs on it.
For each query (an SST-2 test sentence; v = ∇θ m_y, the prediction-level measurement):

  * the served LiSSA: iterations, relative change, converged, time (and the wall time with
    building the solver: μ̃_max on the first call);
  * the CG reference x* = (H + δI)⁻¹ v: CG to --cg-tol relative residual or its maximum
    iterations (--cg-max-iter, lowered to what the budget allows; which one stopped it is
    reported, with the true residual ‖v − (H + δI)x*‖ / ‖v‖ recomputed at the end);
  * ‖x − x*‖ / ‖x*‖ of every LiSSA run, and on the first query, while the budget lasts, the
    --extra-configs of CONFIGS below (relative change and error traces);
  * the ranking each implies: I(z_i, m_y) = −⟨x, ∇θL(z_i)⟩ over --rank-examples seeded random
    training examples against the one x* implies: top-10 / top-100 overlap of the supporters,
    Spearman over x*'s 100 largest |I|, relative L2 of the score vector.

Loads the bundle (≈ 2 GB RSS): run it under `flock /work/heavy.lock`. Prints the figures and
writes bench/results/<--out-name>.json after every query.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch
from _common import load_runtime, log, no_stop, sample_sentences
from _influence import training_pass
from _results import write_result
from faithfulness import ScopeModel
from torch import Tensor

from pairdots_server.core.curvature import Curvature
from pairdots_server.core.ihvp.base import InverseHVPSolver
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.lissa import (
    LissaSolver,
    estimate_preconditioned_lambda_max,
)
from pairdots_server.core.measure import grad_theta_margin
from pairdots_server.influence import solvers_iterative
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_policy import (
    SolverChoice,
    SolverSettings,
    solve_s_test,
)
from pairdots_server.influence.solvers_iterative import lambda_max, lissa_preconditioner


@dataclasses.dataclass(frozen=True)
class Config:
    """One LiSSA run: preconditioner ("none", "low_rank", "diagonal", "ekfac"), minibatch size
    (None = the full sample), depth, check window, scale = scale_factor · μ̃_max(mu_batch)
    (or `scale` when given)."""

    preconditioner: str
    batch_size: int | None
    depth: int
    check_every: int
    tol: float = 0.01
    scale_factor: float = 1.0
    scale: float | None = None
    mu_batch: int | None = 16
    repeats: int = 1


CONFIGS: dict[str, Config] = {
    # today's served default: M = I, batch 8, check window 10 (depth cut for the bench)
    "paper": Config("none", 8, 300, 10, tol=0.01),
    # the served preconditioned recursion, but s from power iteration on one batch of 16
    # (instead of 1 + λ_k/δ from the stored eigenvalues)
    "lowrank_full_pow": Config("low_rank", None, 30, 1),
    "lowrank_full_s1": Config("low_rank", None, 20, 1, scale=1.0),
    "lowrank_b16": Config("low_rank", 16, 80, 5),
    "lowrank_b64": Config("low_rank", 64, 40, 2, mu_batch=64),
    "diagonal_b16": Config("diagonal", 16, 80, 5),
    "diagonal_full": Config("diagonal", None, 8, 1),
    "ekfac_full": Config("ekfac", None, 6, 1),
}


def margin_gradient(rt: ModelRuntime, text: str) -> tuple[Tensor, int]:
    """(∇θ m_y [P], y) for the predicted class y of `text`."""
    enc = rt.encode_texts([text])
    with torch.no_grad():
        y = int(rt.task.logits_fn(rt.params, enc.embeds, enc.mask).argmax(-1))
    return grad_theta_margin(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, y), y


def rel_err(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def ranking_agreement(scores: Tensor, ref: Tensor) -> dict[str, float]:
    """Top-10/100 overlap of the supporters (largest I), Spearman over ref's 100 largest |I|,
    relative L2 of the scores."""
    from scipy import stats

    out: dict[str, float] = {"score_rel_l2": rel_err(scores, ref)}
    n = int(ref.shape[0])
    for k in (10, 100):
        a = set(torch.topk(scores, min(k, n)).indices.tolist())
        b = set(torch.topk(ref, min(k, n)).indices.tolist())
        out[f"top{k}_overlap"] = len(a & b) / min(k, n)
    top = torch.topk(ref.abs(), min(100, n)).indices
    out["spearman_top100"] = float(stats.spearmanr(scores[top].numpy(), ref[top].numpy())[0])
    return out


def run_config(
    rt: ModelRuntime,
    name: str,
    cfg: Config,
    v: Tensor,
    ref: Tensor,
    seed: int,
    mu_cache: dict[tuple[str, int | None], float],
) -> tuple[Tensor, dict[str, Any]]:
    op = solvers_iterative.curvature_operator(rt, Curvature.GGN, seed)
    lam = lambda_max(rt, op, seed)
    damping = 0.01 * lam
    trace: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def observe(repeat: int, step: int, x: Tensor) -> None:
        trace.append(
            {
                "repeat": repeat,
                "step": step,
                "seconds": time.perf_counter() - t0,
                "rel_err_vs_cg": rel_err(x, ref),
            }
        )

    def progress(repeat: int, step: int, rel: float, norm: float) -> None:
        trace.append({"rel_change": rel, "norm": norm})
        log(f"    {name} r{repeat} step {step}: rel_change {rel:.3g}")

    m_inv: InverseHVPSolver | None = None
    mu: float | None = None
    if cfg.preconditioner != "none":
        m_inv = lissa_preconditioner(rt, cfg.preconditioner, damping)
        key = (cfg.preconditioner, cfg.mu_batch)
        if cfg.scale is None and key not in mu_cache:
            t_mu = time.perf_counter()
            batch = (
                None
                if cfg.mu_batch is None
                else op.batches.sample(cfg.mu_batch, torch.Generator().manual_seed(seed))
            )
            mu_cache[key] = estimate_preconditioned_lambda_max(
                op, m_inv, damping, 10, seed, batch=batch
            )
            log(
                f"  μ̃_max({cfg.preconditioner}, batch {cfg.mu_batch}) = {mu_cache[key]:.4g} "
                f"({time.perf_counter() - t_mu:.1f} s)"
            )
        mu = mu_cache.get(key)
    scale = cfg.scale if cfg.scale is not None else (None if mu is None else cfg.scale_factor * mu)
    solver = LissaSolver(
        op,
        damping=damping,
        scale=scale,
        depth=cfg.depth,
        repeats=cfg.repeats,
        batch_size=cfg.batch_size,
        tol=cfg.tol,
        seed=seed,
        check_every=cfg.check_every,
        lambda_max=lam,
        progress=progress,
        observe=observe,
        preconditioner=m_inv,
        preconditioner_name=cfg.preconditioner,
    )
    t0 = time.perf_counter()
    res = solver.solve(v)
    d = res.diagnostics
    merged = [dict(a, **b) for a, b in zip(trace[0::2], trace[1::2])]
    out = {
        **dataclasses.asdict(cfg),
        "scale_used": float(solver.resolve()[1]),
        "iterations": d.iterations,
        "seconds": d.seconds,
        "rel_change": d.rel_change,
        "converged": d.converged,
        "rel_err_vs_cg": rel_err(res.x, ref),
        "trace": merged,
    }
    log(
        f"  {name}: {d.iterations} steps {d.seconds:.1f} s, rel_change {d.rel_change:.3g}, "
        f"converged {d.converged}, ‖x − x_cg‖/‖x_cg‖ {out['rel_err_vs_cg']:.4f}"
    )
    return res.x, out


def served(rt: ModelRuntime, v: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """SOLVER_LISSA with no options through solver_policy (what the API runs)."""
    t0 = time.perf_counter()
    x, diag = solve_s_test(rt, v, SolverSettings(method=SolverChoice.LISSA), no_stop)
    wall = time.perf_counter() - t0  # + building the solver (μ̃_max on the first call)
    out = {**diag, "wall_seconds": wall}
    log(
        f"  served: {diag['iterations']} steps {diag['seconds']:.1f} s, rel_change "
        f"{diag['rel_change']:.3g}, converged {diag['converged']}, "
        f"wall {wall:.1f} s "
        f"({diag['damping_rule']})"
    )
    return x, out


def timed(fn: Any, *a: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="bundles/minilm-sst2")
    ap.add_argument("--queries", type=int, default=2, help="SST-2 test sentences (at most)")
    ap.add_argument("--configs", default="served", help=f"comma list of served,{','.join(CONFIGS)}")
    ap.add_argument(
        "--extra-configs",
        default="lowrank_full_pow,lowrank_b16,paper",
        help="run on the first query while the budget lasts",
    )
    ap.add_argument("--cg-max-iter", type=int, default=60)
    ap.add_argument("--cg-tol", type=float, default=1e-6)
    ap.add_argument("--rank-examples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-time budget of the run")
    ap.add_argument("--out-name", default="lissa_convergence")
    args = ap.parse_args()
    t_start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    rt, load_s = load_runtime(args.bundle, args.threads)
    log(f"loaded {rt.name} in {load_s:.1f} s: P = {rt.num_params}, N = {rt.n_train}")
    # the served curvature operator feeds the scoped top from cached h_L (runtime.train_batch);
    # the same bundle without the split runs every layer per product: the reference
    op = solvers_iterative.curvature_operator(rt, Curvature.GGN, args.seed)
    full_rt = ModelRuntime(rt.bundle, scope_inputs=False, warm_words=False)
    full_op = solvers_iterative.curvature_operator(full_rt, Curvature.GGN, args.seed)
    probe = torch.randn(rt.num_params, generator=torch.Generator().manual_seed(1))
    b_full = next(iter(full_op.batches.full()))
    full_op.matvec(probe, b_full)  # first call pays one-off costs
    hv_full_model, t_served_batch = timed(full_op.matvec, probe, b_full)
    b0, t_cache = timed(lambda: next(iter(op.batches.full())))
    hv_scope, t_scope_batch = timed(op.matvec, probe, b0)
    scope_diff = rel_err(hv_scope, hv_full_model)
    log(
        f"batch of {b0.size}: full-model GGN-vector product {t_served_batch:.2f} s, on cached "
        f"scope inputs {t_scope_batch:.2f} s (caching {t_cache:.1f} s), relative difference "
        f"{scope_diff:.2g}"
    )
    sm = ScopeModel(rt)
    lam, lam_s = timed(lambda_max, rt, op, args.seed)
    damping = 0.01 * lam
    _, full_mv_s = timed(op.matvec, probe)
    log(
        f"λ_max {lam:.4g} ({lam_s:.1f} s), δ {damping:.4g}; one full-sample matvec "
        f"({len(op.batches)} examples) {full_mv_s:.1f} s"
    )
    gen = torch.Generator().manual_seed(args.seed)
    rank_idx = torch.randperm(rt.n_train, generator=gen)[: args.rank_examples].tolist()
    hidden: list[Tensor] = [torch.empty(0)] * rt.n_train
    for b in range(0, len(rank_idx), 64):
        idx = rank_idx[b : b + 64]
        enc = rt.encode_train(idx)
        h = sm.hidden(enc.embeds, enc.mask)
        for j, i in enumerate(idx):
            hidden[i] = h[j, : int(enc.mask[j].sum())].clone()
    every = [c.strip() for c in args.configs.split(",") if c.strip()]
    extra = [c.strip() for c in args.extra_configs.split(",") if c.strip()]
    mu_cache: dict[tuple[str, int | None], float] = {}
    queries: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "bench": "lissa_convergence",
        "bundle": rt.name,
        "n_train": rt.n_train,
        "scope_parameters": rt.num_params,
        "curvature_sample": len(op.batches),
        "threads": args.threads,
        "budget_s": args.budget_s,
        "operator": "GGN on the served curvature sample, evaluated on cached hidden states "
        "entering the scope (the served code path through solver_policy)",
        "batch_matvec_seconds": {"full_model": t_served_batch, "cached_scope": t_scope_batch},
        "cached_vs_full_model_rel_diff": scope_diff,
        "lambda_max": lam,
        "lambda_max_seconds": lam_s,
        "damping": damping,
        "full_matvec_seconds": full_mv_s,
        "rank_examples": len(rank_idx),
        "queries": queries,
    }
    ranking_s = 0.0
    for qi, (text, gold) in enumerate(sample_sentences(args.queries, args.seed)):
        if qi > 0 and left() < 30 * full_mv_s + ranking_s:
            log(f"budget: query {qi} skipped ({left():.0f} s left)")
            break
        v, y = margin_gradient(rt, text)
        log(f"query {qi}: {text!r} (gold {gold}, predicted {y}), ‖v‖ {float(v.norm()):.4g}")
        xs: dict[str, Tensor] = {}
        runs: dict[str, Any] = {}
        x_first, first = served(rt, v)
        reserve = ranking_s or 0.15 * args.budget_s
        max_iter = max(5, min(args.cg_max_iter, int((left() - reserve) / (1.15 * full_mv_s))))
        cg = CGSolver(op, damping, max_iter=max_iter, tol=args.cg_tol)
        res = cg.solve(v)
        x_ref = res.x
        true_res = float((v - op.matvec(x_ref) - damping * x_ref).norm() / v.norm())
        d = res.diagnostics
        cg_out = {
            "max_iterations": max_iter,
            "iterations": d.iterations,
            "seconds": d.seconds,
            "recursive_residual": d.rel_change,
            "true_residual": true_res,
            "stopped_by": "tolerance" if d.converged else "max_iterations",
        }
        log(
            f"  CG: {d.iterations} its {d.seconds:.1f} s, residual {d.rel_change:.3g} "
            f"(true {true_res:.3g}), stopped by {cg_out['stopped_by']} (max {max_iter})"
        )
        first["rel_err_vs_cg"] = rel_err(x_first, x_ref)
        log(f"  served: ‖x − x_cg‖/‖x_cg‖ {first['rel_err_vs_cg']:.4f}")
        xs["served"], runs["served"] = x_first, first
        for name in every + (extra if qi == 0 else []):
            if name == "served":
                continue
            cfg = CONFIGS[name]
            cost = cfg.depth * (cfg.batch_size or len(op.batches)) / len(op.batches) * full_mv_s
            if left() < cost + ranking_s + 10:
                log(f"  budget: {name} skipped (≈ {cost:.0f} s, {left():.0f} s left)")
                continue
            xs[name], runs[name] = run_config(rt, name, cfg, v, x_ref, args.seed, mu_cache)
        names = list(xs)
        if args.rank_examples > 0:
            block = torch.stack([x_ref] + [xs[n] for n in names], dim=1).float()
            t_rank = time.perf_counter()
            (scores,), _ = training_pass(
                rt, [block], 32, False, indices=rank_idx, scope_inputs=(sm.logits, hidden)
            )
            scores = scores[rank_idx]
            ranking_s = time.perf_counter() - t_rank
            for j, name in enumerate(names, start=1):
                runs[name]["ranking"] = ranking_agreement(scores[:, j], scores[:, 0])
                log(f"    {name}: {runs[name]['ranking']}")
        queries.append(
            {
                "text": text,
                "gold": gold,
                "predicted": y,
                "v_norm": float(v.norm()),
                "cg": cg_out,
                "lissa": runs,
            }
        )
        payload["mu_max"] = {f"{k[0]}@{k[1]}": val for k, val in mu_cache.items()}
        payload["seconds"] = time.perf_counter() - t_start
        path = write_result(args.out_name, payload)
        log(f"wrote {path} ({left():.0f} s of the budget left)")


if __name__ == "__main__":
    main()
