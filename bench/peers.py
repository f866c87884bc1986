"""pairdots against the peer libraries (issue 13 item 5): one model, scope, training set, query
set and measurement, through pairdots, Kronfluence, dattri and Captum.

What is the same for every method:
* model and scope: the bundle's model (minilm-sst2: MiniLM fine-tuned on SST-2) and its scope
  (last encoder layer + pooler + classifier; 1.92 M parameters), as one nn.Module on the cached
  hidden states entering the scope (bench/_peers_scope.ScopeNet; the frozen layers below never
  change, so every library does one transformer layer per example instead of six).
* training set: all N examples of the bundle (6,920), every one scored (no prefilter), except
  by pairdots_prefilter (below), which scores exactly only the index's candidates, and by
  pairdots_sketch (below), which scores none exactly (every one by the index's estimate).
* queries: the first --queries SST-2 test sentences that bench/faithfulness.py picks (seed 1),
  measurement f = m_y, the logit margin of the predicted label (pairdots' prediction level).
* influence I(z_i, f) = −∇θf(x)ᵀ (H + δI)⁻¹ ∇θL(z_i) in pairdots' sign (positive = supporting;
  the peers return +∇fᵀH⁻¹∇L, so their scores are negated: a convention, not a fit).
* curvature data: where a method fits a curvature (Hessian, GGN, Fisher, EK-FAC, Arnoldi,
  LiSSA), it fits it on the same fixed random subset of --hessian-examples training examples
  (a full-data Hessian is out of reach of 2 CPU cores), with the same damping δ where the
  method takes one. pairdots' own fitted artifacts (diagonal Fisher, EK-FAC, low-rank GGN)
  are the bundle's, fitted at prepare time over the full training set (their fit time is
  not charged: `prepare` did it once per bundle).
* reference: s_ref = (G + δI)⁻¹ ∇θf, G = the Gauss-Newton matrix of the mean cross-entropy
  over the Hessian subset, applied exactly as G v = Aᵀ(A v)/m with A's rows √(p₀p₁)·∇θ(z₀ − z₁)
  (binary CE: ∂²L/∂z² = p₀p₁ uuᵀ, u = (1, −1)); checked against pairdots' CurvatureOperator
  (GGN) on a random vector over 64 of the examples. Solved through the Woodbury identity,
  s = (g − Aᵀc)/δ with (mδI + AAᵀ) c = A g, by conjugate gradient in float64 to relative
  residual 1e-12 (checked against the direct solve; a CG in parameter space reads the whole
  A twice per iteration). δ = --damping-scale · λ_max(G) (pairdots' rule for iterative
  solvers). The GGN, not the Hessian, because it is positive semi-definite (the Hessian of
  the fine-tuned model is indefinite, docs/DESIGN.md §2) and is what EK-FAC and the Fisher
  approximate.

pairdots_prefilter is the served Explain path for one prediction-level query, by the service's
own functions (influence/pipeline.py), from the cached query gradient ∇θf:
  s_test      pipeline.s_test with the bundle's low-rank solver (as pairdots_low_rank: the same
              vector, checked against its cached one);
  candidates  pipeline.candidates: the bundle's FAISS index of sparse-sign projected training
              gradients (k = 1024) searched with ∓Pᵀs_test, the top C per direction, C =
              --prefilter-candidates (0: the served default, config.ExplainLimits:
              clamp(2 % · N, 50, 2000) = 138 here), their union scored;
  exact       pipeline.score_examples on the union: the scope-input jvp path (one jvp of the
              scoped top per batch, from cached h_L). The bundle has no scope_inputs file, so
              the runtime's ScopeInputs cache is filled with this bench's cached h_L through
              ScopeInputs.load (what the bundle file would give; a few rows checked against
              the trunk) before timing, like the low-rank factors and the index (loaded
              first, not charged: prepare-time artifacts).
Timed per query, wall clock in the child: s_test + candidates + exact scoring (score_s =
candidates + exact, summed over the queries, so s/query amortised = the mean end to end).
For the agreement metrics every training example needs a score: candidates get their exact
score, every other example its projected estimate −⟨Pᵀs_test, Pᵀg_i⟩ (the index's own inner
product, from one search of all N with −Pᵀs_test, outside the timed path), NOT rescaled: the
sketch is unbiased, E⟨Sx, Sy⟩ = ⟨x, y⟩ (index/sparse_sign.py), so the estimate is on the exact
score's scale. Recorded as fill_in: the least-squares slope of exact on estimate over the
candidates and their Pearson r (the slope is below 1 on them because they were picked for
extreme estimates, so it is no rescale for the rest), and how many non-candidates the filled
ranking puts in its top 10 (they are not clamped, so one may outrank a candidate); the report
also gives top10_overlap_candidates_only, the overlap of the reference's top 10 with the top
10 among the candidates by exact score (what Explain returns). One record per (C, --threads):
methods/pairdots_prefilter[_c<C>]_t<threads>.pt; the report lists every one cached.

pairdots_sketch is the fast approximate mode for a ranking of the whole training set: the same
pipeline.s_test (low-rank), then the projection Pᵀs_test and one search of the bundle's index
with −Pᵀs_test over all N (what pipeline.candidates does, with K = N), and the index's estimate
−⟨Pᵀs_test, Pᵀg_i⟩ (not rescaled) is every example's score; no exact scoring. Timed per query,
wall clock in the child, end to end: s_test + projection + search (and the scatter of the N
scores into training-set order); score_s = projection + search, summed over the queries.
Warm-up (index, projection, low-rank factors loaded) is not charged. Also recorded: the
agreement of the estimate with the exact scores of the same s_test (pairdots_low_rank in the
shared pass), and its largest difference from pairdots_prefilter's fill-in of the
non-candidates (the same estimate). One record per --threads: methods/pairdots_sketch_t<t>.pt.

Versus the peers (pairdots_vs_fastest_peer in the JSON): pairdots_diagonal against the fastest
peer, and every pairdots_prefilter* and pairdots_sketch* record against every peer: the speed-up
(the peer's amortised s/query over the record's), whether the record's agreement is equal or
better on all three metrics (and which metrics are worse), and whether it is ≥ 2× faster than
the fastest peer at equal or better agreement.

Figures per method: fit seconds (once, amortised over its queries), seconds per query of the
solve (transform), seconds of scoring all N examples (a pass of per-example gradients serves
every query at once, so it is amortised as well; pairdots' Explain path scores one query by one
jvp pass, measured separately), peak RSS of the process that ran it, Spearman over the
reference's top 100 supporting examples, over all N, and top-10 overlap, mean over queries.

Phases, resumable (everything lands under --cache, default /var/tmp/pairdots-peers/<bundle>):
  prepare       reference, query gradients, Hessian subset (a child process)
  method NAME   one method (a child process, so its peak RSS is its own)
  pass          one pass of per-example training gradients scoring the reference and pairdots'
                solvers (dattri's query-side vectors are scored in their own child by
                pairdots' jvp scoring; the pass's time is charged to them as their scoring)
  report        the table -> bench/results/<--name>.json (no model loaded)
  all           the above in order, skipping what is cached, starting nothing new after
                --budget-min minutes (rerun to continue)

  flock /work/heavy.lock python3 bench/peers.py --bundle bundles/minilm-sst2 --budget-min 18
  python3 bench/peers.py --phase method --method pairdots_prefilter --threads 1 \
      --prefilter-candidates 346        # 5 % of N per direction, one thread
  python3 bench/peers.py --phase method --method pairdots_sketch --threads 1

Needs the `peers` extra (dattri, captum) and kronfluence installed with --no-deps (its
requirements pull torchvision and a CUDA torch): pip install --no-deps kronfluence==1.0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from _common import load_runtime, log
from _peers_scope import (
    Rows,
    ScopeNet,
    agreement,
    collate,
    length_order,
    loader,
    margin,
    mean_ce,
    pad,
    peak_rss_mb,
)
from _results import write_result
from torch import Tensor

from pairdots_server.config import ExplainLimits
from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import Curvature, CurvatureOperator
from pairdots_server.core.grads import VmapMask, per_example_loss_grads
from pairdots_server.core.measure import grad_theta_margin
from pairdots_server.core.params import flatten_batched
from pairdots_server.core.scoring import Row, score_rows
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.solver_policy import (
    SolverChoice,
    SolverSettings,
    is_available,
    solve_s_test,
)

HERE = Path(__file__).resolve().parent

# query-side methods (scored by the shared pass) and methods with their own scoring pass
PAIRDOTS = ("pairdots_diagonal", "pairdots_identity", "pairdots_ekfac", "pairdots_low_rank")
VECTOR_METHODS = PAIRDOTS + ("dattri_lissa", "dattri_cg", "dattri_arnoldi")
OWN_PASS = ("kronfluence_ekfac", "captum_tracincpfast")
# the served path (index prefilter + exact scoring of the candidates); one record per C, threads
PREFILTER = "pairdots_prefilter"
# the index's estimate alone for every training example (no exact scoring); one record per threads
SKETCH = "pairdots_sketch"
PER_CONFIG = (PREFILTER, SKETCH)
# in the order they run (the cheap and the default first)
DEFAULT_METHODS = ",".join(
    PAIRDOTS + OWN_PASS + VECTOR_METHODS[len(PAIRDOTS) :] + (PREFILTER, SKETCH)
)
# peers not wired into this bench, with the reason recorded in the JSON
NOT_RUN = {
    "dattri_ekfac": "fails on this model: dattri 0.3.0's EK-FAC covariance update "
    "(dattri/func/fisher._update_covariance) handles only 2-D layer inputs; the encoder "
    "layer's [B,T,D] activations raise UnboundLocalError (tried on the tiny bundle)",
    "dattri_trak": "not run: TRAK's CPU projector of 1.92 M-dim gradients and its own pass did "
    "not fit this session's time",
    "captum_arnoldi": "not run: Captum's ArnoldiInfluenceFunction (its own HVPs and train-side "
    "projections) did not fit this session's time",
}


# -- the shared context ------------------------------------------------------------------------
class Context:
    """What every phase shares: the runtime, the scope module, the cached inputs, the queries."""

    def __init__(self, args: argparse.Namespace, need_inputs: bool = True) -> None:
        self.args = args
        self.cache = Path(args.cache)
        self.rt, self.load_s = load_runtime(args.bundle, args.threads)
        self.net = ScopeNet(self.rt)
        self.fn = self.net.logits_fn()
        inputs = ensure_inputs(self.rt, args)
        self.hidden: list[Tensor] = inputs["hidden"]
        self.labels: list[int] = [int(y) for y in inputs["labels"]]
        self.n = len(self.hidden)
        qs = inputs["queries"][: args.queries]
        self.queries = [(q["h"][:1].clone(), q["mask"][:1].clone(), int(q["pred"])) for q in qs]
        self.query_texts = [q["text"] for q in qs]
        self.order = length_order(self.hidden, range(self.n))
        rng = random.Random(args.hessian_seed)
        self.subset = sorted(rng.sample(range(self.n), min(args.hessian_examples, self.n)))

    def train_rows(self) -> Rows:
        """All training examples, sorted by length (scores are mapped back by self.order)."""
        return Rows(self.hidden, self.labels, self.order)

    def hessian_rows(self) -> Rows:
        return Rows(self.hidden, self.labels, length_order(self.hidden, self.subset))

    def query_batch(self, count: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        qs = self.queries[: count or len(self.queries)]
        h, m = pad([q[0][0] for q in qs])
        return h, m, torch.tensor([q[2] for q in qs])

    def unsort(self, scores_sorted: Tensor) -> Tensor:
        """Scores over the length-sorted training rows [N, …] -> training-set order."""
        out = torch.empty_like(scores_sorted)
        out[torch.tensor(self.order)] = scores_sorted
        return out

    def prep(self) -> dict[str, Any]:
        return torch.load(self.cache / "prep.pt", weights_only=False)


def ensure_inputs(rt: ModelRuntime, args: argparse.Namespace) -> dict[str, Any]:
    """bench/faithfulness.py's cached scope inputs (hidden states entering the scope for every
    training example, and its queries); computed by its `prepare` code when missing."""
    path = Path(args.inputs) / "inputs.pt"
    if not path.exists():
        import faithfulness

        ns = argparse.Namespace(queries=args.queries, seed=1, attributions="", budget_min=1e9)
        faithfulness.prepare(rt, faithfulness.ScopeModel(rt), faithfulness.Cache(path.parent), ns)
    return torch.load(path, weights_only=False)


def versions() -> dict[str, str]:
    out = {}
    for d in ("torch", "transformers", "kronfluence", "dattri", "captum"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def record_name(args: argparse.Namespace, method: str) -> str:
    """The cached record's name: the method's, with C (when not the default) and the threads
    for pairdots_prefilter, with the threads for pairdots_sketch (one record per
    configuration)."""
    if method == SKETCH:
        return f"{SKETCH}_t{args.threads}"
    if method != PREFILTER:
        return method
    c = f"_c{args.prefilter_candidates}" if args.prefilter_candidates else ""
    return f"{PREFILTER}{c}_t{args.threads}"


def expand_names(cache: Path, names: list[str]) -> list[str]:
    """`names` with pairdots_prefilter / pairdots_sketch replaced by every cached record of
    that method (pairdots_prefilter*, pairdots_sketch*)."""
    out: list[str] = []
    for n in names:
        found = (
            sorted(p.stem for p in (cache / "methods").glob(f"{n}_*.pt")) if n in PER_CONFIG else []
        )
        out += found or [n]
    return out


def save(ctx: Context, name: str, record: dict[str, Any]) -> None:
    record["peak_rss_mb"] = peak_rss_mb()
    record["load_average_after"] = os.getloadavg()
    record["load_s"] = ctx.load_s
    (ctx.cache / "methods").mkdir(parents=True, exist_ok=True)
    torch.save(record, ctx.cache / "methods" / f"{name}.pt")
    log(
        f"{name}: saved ({ {k: v for k, v in record.items() if isinstance(v, (int, float, str))} })"
    )


# -- prepare: query gradients, GGN rows of the Hessian subset, the reference ------------------
class ExplicitGGN:
    """G v = Aᵀ(A v)/m for A [m,P] (duck-types pairdots' CurvatureOperator for CGSolver)."""

    def __init__(self, a: Tensor) -> None:
        self.a = a

    @property
    def num_params(self) -> int:
        return int(self.a.shape[1])

    def matvec(self, v: Tensor) -> Tensor:
        return self.a.T @ (self.a @ v) / self.a.shape[0]


def block_cg(
    matvec: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, list[dict[str, Any]]]:
    """X = M⁻¹ B column by column by conjugate gradient for a symmetric positive definite M given
    by `matvec` (the iteration of pairdots' core/ihvp/cg.CGSolver, on all columns at once); a
    column stops once its relative residual ‖b − Mx‖/‖b‖ ≤ tol."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    bn = b.norm(dim=0)
    iters = torch.zeros(b.shape[1], dtype=torch.long)
    for _ in range(max_iter):
        active = (rs.sqrt() / bn) > tol
        if not bool(active.any()):
            break
        ap = matvec(p)
        alpha = torch.where(active, rs / (p * ap).sum(0), torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(0)
        p = r + torch.where(active, rs_new / rs, torch.zeros_like(rs)) * p
        rs = torch.where(active, rs_new, rs)
        iters += active.long()
    true_rel = (b - matvec(x)).norm(dim=0) / bn
    diags = [
        {
            "iterations": int(iters[j]),
            "rel_residual": float(true_rel[j]),
            "converged": bool(true_rel[j] <= tol),
        }
        for j in range(b.shape[1])
    ]
    return x, diags


def ggn_rows(ctx: Context, rows: list[int], chunk: int = 16) -> Tensor:
    """A [m,P]: row i = √(p₀p₁)·∇θ(z₀ − z₁)(x_i), so GGN = AᵀA/m for binary cross-entropy."""
    params = {k: v.detach() for k, v in ctx.rt.params.items()}

    def d(p: dict[str, Tensor], h: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        z = ctx.fn(p, h[None], m[None])[0]
        return z[0] - z[1], z.detach()

    g = torch.func.vmap(torch.func.grad(d, has_aux=True), in_dims=(None, 0, 0))
    out = torch.empty(len(rows), ctx.rt.num_params)
    order = length_order(ctx.hidden, rows)
    pos = {i: k for k, i in enumerate(rows)}
    for b in range(0, len(order), chunk):
        idx = order[b : b + chunk]
        h, m = pad([ctx.hidden[i] for i in idx])
        grads, z = g(params, h, m)
        p = torch.softmax(z, -1)
        w = (p[:, 0] * p[:, 1]).sqrt()
        out[[pos[i] for i in idx]] = flatten_batched(grads, len(idx)) * w[:, None]
    return out


def phase_prepare(ctx: Context) -> None:
    args, rt = ctx.args, ctx.rt
    params = {k: v.detach() for k, v in rt.params.items()}
    # the scope module reproduces the served model on a query (full model from its text)
    enc = rt.task.encode([ctx.query_texts[0]], max_length=rt.max_length)
    full = rt.task.logits_fn(params, rt.task.embed(enc.input_ids).detach(), enc.attention_mask)
    if full.shape[1] != 2:
        raise SystemExit("the exact GGN reference here is written for 2 classes")
    h, m, _ = ctx.query_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(ctx.net(h, m), full.detach(), rtol=1e-4, atol=1e-4)
    t0 = time.perf_counter()
    qgrads = torch.stack(
        [grad_theta_margin(ctx.fn, params, h, m, y) for h, m, y in ctx.queries], 1
    )  # [P,Q]
    grad_s = (time.perf_counter() - t0) / len(ctx.queries)
    t0 = time.perf_counter()
    a = ggn_rows(ctx, ctx.subset)
    rows_s = time.perf_counter() - t0
    mcount = a.shape[0]
    kernel = (a @ a.T).double() / mcount  # [m,m]: the non-zero spectrum of G (no [m,P] copy)
    eig = torch.linalg.eigvalsh(kernel)
    lam_max = float(eig[-1])
    delta = args.damping_scale * lam_max
    log(f"GGN rows of {mcount} examples in {rows_s:.0f} s; λ_max {lam_max:.4g}, δ {delta:.4g}")
    # A is pairdots' GGN: compare with its CurvatureOperator on one random vector, over the
    # first 64 examples of the subset (a GGN-vp over all 512 takes a minute here)
    few = ctx.subset[:64]
    hs, ms = pad([ctx.hidden[i] for i in few])
    ys = torch.tensor([ctx.labels[i] for i in few])
    op = CurvatureOperator(ctx.fn, params, TensorBatches(hs, ms, ys, 32), Curvature.GGN)
    v = torch.randn(rt.num_params, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    gv_op = op.matvec(v)
    ggnvp_s = time.perf_counter() - t0
    gv = ExplicitGGN(a[:64]).matvec(v)
    ggn_check = float((gv - gv_op).norm() / gv_op.norm())
    log(f"explicit GGN vs CurvatureOperator (64 ex.): rel diff {ggn_check:.2e} ({ggnvp_s:.1f} s)")
    # s_ref = (δI + AᵀA/m)⁻¹ g = (g − Aᵀc)/δ with (mδI + AAᵀ) c = A g (Woodbury), the m×m
    # system solved by CG in float64 (a CG in P-space reads the 3.9 GB A twice per iteration)
    t0 = time.perf_counter()
    kd = kernel * mcount + mcount * delta * torch.eye(mcount, dtype=torch.float64)
    ag = (a @ qgrads).double()  # [m,Q]
    c, diags = block_cg(lambda v: kd @ v, ag, tol=1e-12, max_iter=10 * mcount)
    s_ref = (qgrads - a.T @ c.float()) / delta
    cg_s = time.perf_counter() - t0
    closed = (qgrads - a.T @ torch.linalg.solve(kd, ag).float()) / delta  # direct solve
    wood = float(((closed - s_ref).norm(dim=0) / closed.norm(dim=0)).max())
    # and the residual of the P-space system (G + δI) s_ref = g itself
    p_res = (qgrads - ExplicitGGN(a).matvec(s_ref) - delta * s_ref).norm(dim=0) / qgrads.norm(dim=0)
    for d, r in zip(diags, p_res.tolist()):
        d["p_space_rel_residual_fp32"] = r
    log(f"reference CG: {diags[0]} … in {cg_s:.1f} s; vs the direct solve {wood:.2e}")
    torch.save(
        {
            "qgrads": qgrads,
            "s_ref": s_ref,
            "delta": delta,
            "lam_max": lam_max,
            "eig_top": eig.flip(0)[:10].tolist(),
            "subset": ctx.subset,
            "reference": {
                "curvature": "GGN of the mean cross-entropy over the Hessian subset",
                "hessian_examples": mcount,
                "damping": delta,
                "damping_rule": f"{args.damping_scale} × λ_max(G)",
                "lambda_max": lam_max,
                "cg": "CG (float64) on the Woodbury system (mδI + AAᵀ) c = A g, tol 1e-12; "
                "s = (g − Aᵀc)/δ",
                "solves": diags,
                "cg_seconds": cg_s,
                "ggn_rows_seconds": rows_s,
                "ggn_vs_curvature_operator_rel_diff": ggn_check,
                "one_ggn_vp_seconds_curvature_operator": ggnvp_s,
                "cg_vs_direct_solve_max_rel_diff": wood,
            },
            "query_grad_seconds": grad_s,
            "query_texts": ctx.query_texts,
            "query_labels": [q[2] for q in ctx.queries],
            "peak_rss_mb": peak_rss_mb(),
        },
        ctx.cache / "prep.pt",
    )


# -- query-side methods: a vector x_j ≈ H⁻¹∇θf_j per query, scored by the shared pass ------------
def jvp_scores(ctx: Context, xs: Tensor) -> Tensor:
    """I = −⟨x_j, ∇θL(z_i)⟩ for every training example and column of xs [P,q], by pairdots'
    exact scoring (core/scoring.score_rows: one jvp pass per column) -> [N,q]."""
    rows = [
        Row(ctx.hidden[i], torch.ones(ctx.hidden[i].shape[0], dtype=torch.long), ctx.labels[i])
        for i in range(ctx.n)
    ]
    params = {k: v.detach() for k, v in ctx.rt.params.items()}
    return torch.stack(
        [score_rows(ctx.fn, params, xs[:, j], rows, batch_size=64) for j in range(xs.shape[1])], 1
    )


def method_pairdots(ctx: Context, name: str) -> dict[str, Any]:
    """pairdots' Explain path: s_test by the bundle's solver (solve_s_test), then exhaustive exact
    scoring of every training example by one jvp pass per query (core/scoring.score_rows)."""
    choice = SolverChoice(name.removeprefix("pairdots_"))
    if not is_available(ctx.rt, choice):
        return {"skipped": f"the bundle has no {choice.value} artifact"}
    prep = ctx.prep()
    qg = prep["qgrads"]
    xs: list[Tensor] = []
    diag: dict[str, Any] = {}
    t0 = time.perf_counter()
    for j in range(qg.shape[1]):
        x, diag = solve_s_test(
            ctx.rt, qg[:, j].to(ctx.rt.task.dtype), SolverSettings(method=choice), lambda: None
        )
        xs.append(x.float())
    solve_s = (time.perf_counter() - t0) / qg.shape[1]
    rec: dict[str, Any] = {
        "vectors": torch.stack(xs, 1),
        "fit_s": 0.0,
        "solve_s_per_query": solve_s,
        "queries": qg.shape[1],
        "settings": {k: diag.get(k) for k in ("effective_damping", "damping_rule")},
        "fit_note": "the bundle's artifact, fitted over all N examples at prepare time",
    }
    if name == "pairdots_diagonal":  # the default: time its own exhaustive scoring per query
        t0 = time.perf_counter()
        rec["jvp_scores"] = jvp_scores(ctx, rec["vectors"][:, : ctx.args.jvp_queries])
        rec["score_s_per_query"] = (time.perf_counter() - t0) / ctx.args.jvp_queries
    return rec


def fill_scope_inputs(ctx: Context, check_rows: int = 3) -> dict[str, Any]:
    """The runtime's scope-input cache filled with this bench's cached h_L through
    ScopeInputs.load (what a bundle's scope_inputs file gives the service), and the largest
    relative difference of `check_rows` rows against the runtime's own trunk."""
    rt = ctx.rt
    cache = rt.scope_inputs()
    if cache is None:
        raise SystemExit("pairdots_prefilter needs the runtime's scope split")
    offsets = torch.tensor([0] + [int(h.shape[0]) for h in ctx.hidden]).cumsum(0)
    dtype = str(ctx.hidden[0].dtype).removeprefix("torch.")
    why = cache.load(
        {"hidden": torch.cat(ctx.hidden), "offsets": offsets}, {"key": cache.key, "dtype": dtype}
    )
    if why is not None:
        raise SystemExit(f"scope inputs not taken: {why}")
    few = [0, ctx.n // 2, ctx.n - 1][:check_rows]
    assert rt.split is not None
    fresh = type(cache)(rt.split, rt.encode_train, rt.n_train, cache.key).rows(few)
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(cache.rows(few), fresh))
    return {
        "rows": len(cache),
        "dtype": dtype,
        "trunk_check_rows": few,
        "trunk_check_max_rel_diff": diff,
    }


def served_settings(ctx: Context) -> Any:
    """The service's resolved settings for a prediction-level query: the low-rank solver, C =
    --prefilter-candidates (0: config.ExplainLimits' default), its scoring batch size."""
    rt, limits = ctx.rt, ExplainLimits()
    return InfluenceSettings(
        solver=SolverSettings(method=SolverChoice.LOW_RANK),
        candidates=ctx.args.prefilter_candidates,
    ).resolve(
        rt,
        default_candidates=limits.default_candidates(rt.n_train),
        scoring_batch_size=limits.scoring_batch_size,
    )


def index_estimates(rt: ModelRuntime, s_test: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The index's own estimate of every training example's score, −⟨Pᵀs, Pᵀg_i⟩ ≈ −⟨s, g_i⟩
    = I(z_i, f) -> [N] float64 in training-set order (the projection and the search of
    pipeline.candidates, with −Pᵀs and K = N), and the seconds of its two steps."""
    index, projection = rt.index()
    n = rt.n_train
    t0 = time.perf_counter()
    q = projection.project(s_test[None].float()).cpu().numpy()  # [1,k]
    t1 = time.perf_counter()
    est_sc, est_ids = index.search(-q, n)  # ⟨−Pᵀs, Pᵀg_i⟩, all N, best first
    ids = torch.from_numpy(est_ids[0])
    full = torch.full((n,), math.nan, dtype=torch.float64)
    full[ids[ids >= 0]] = torch.from_numpy(est_sc[0][est_ids[0] >= 0]).double()
    t2 = time.perf_counter()
    return full, {"project": t1 - t0, "search": t2 - t1}


def s_test_check(ctx: Context, xs: list[Tensor]) -> dict[str, float]:
    """Largest relative difference of the s_test vectors from pairdots_low_rank's cached ones."""
    low = ctx.cache / "methods" / "pairdots_low_rank.pt"
    if not low.exists():
        return {}
    v = torch.load(low, weights_only=False)["vectors"]
    x = torch.stack(xs, 1)
    return {
        "s_test_vs_pairdots_low_rank_max_rel_diff": float(
            ((x - v).norm(dim=0) / v.norm(dim=0)).max()
        )
    }


def method_prefilter(ctx: Context, name: str) -> dict[str, Any]:
    """The served Explain path (module docstring): pipeline.s_test (low-rank), then
    pipeline.candidates (the bundle's index, C per direction) and pipeline.score_examples (the
    scope-input jvp path) on their union, timed per query; non-candidates get the projected
    estimate −⟨Pᵀs, Pᵀg_i⟩ for the agreement metrics."""
    rt, args = ctx.rt, ctx.args
    if not rt.has_index or not is_available(rt, SolverChoice.LOW_RANK):
        return {"skipped": "the bundle has no index or no low-rank factors"}
    settings = served_settings(ctx)
    prep = ctx.prep()
    qg = prep["qgrads"].to(rt.task.dtype)
    # what a warm server holds: scope inputs, the index and its projection, low-rank factors
    t0 = time.perf_counter()
    scope = fill_scope_inputs(ctx)
    index, projection = rt.index()
    rt.lowrank()
    warm_s = time.perf_counter() - t0
    n, nq = rt.n_train, qg.shape[1]
    scores = torch.empty(n, nq)
    walls: list[float] = []
    parts: dict[str, list[float]] = {"solve": [], "candidates": [], "exact": []}
    cands: list[list[int]] = []
    xs: list[Tensor] = []
    fill: dict[str, list[float]] = {"slope": [], "pearson": [], "non_candidates_in_top10": []}
    for j in range(nq):
        t0 = time.perf_counter()
        x, _ = steps.s_test(rt, qg[:, j], settings, steps.no_stop)
        t1 = time.perf_counter()
        ids = steps.candidates(rt, x, settings)
        t2 = time.perf_counter()
        exact = steps.score_examples(rt, x, ids, settings, steps.no_stop)  # [K] float64
        t3 = time.perf_counter()
        walls.append(t3 - t0)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[k].append(v)
        # outside the timed path: the estimate of every example, one search over all N
        full, _ = index_estimates(rt, x)
        at = torch.tensor(ids)
        e = full[at]
        fill["slope"].append(float((e * exact).sum() / (e * e).sum()))
        fill["pearson"].append(float(torch.corrcoef(torch.stack([e, exact]))[0, 1]))
        full[at] = exact
        top = set(full.argsort(descending=True)[:10].tolist())
        fill["non_candidates_in_top10"].append(float(len(top - set(ids))))
        scores[:, j] = full.float()
        cands.append(ids)
        xs.append(x.float())
    rec: dict[str, Any] = {
        "scores": scores,
        "candidates": cands,
        "fit_s": 0.0,
        "solve_s_per_query": statistics.fmean(parts["solve"]),
        "score_s": sum(parts["candidates"]) + sum(parts["exact"]),
        "score_is_per_query": True,
        "queries": nq,
        "threads": args.threads,
        "s_per_query_end_to_end": statistics.fmean(walls),
        "s_per_query_end_to_end_per_query": walls,
        "breakdown_s_per_query": {k: statistics.fmean(v) for k, v in parts.items()},
        "candidates_per_direction": settings.candidates,
        "candidates_scored_mean": statistics.fmean(len(c) for c in cands),
        "fill_in": {
            "rule": "non-candidates: −⟨Pᵀs, Pᵀg_i⟩ from the index, not rescaled (unbiased "
            "sketch); slope = least squares of exact on estimate over the candidates",
            **{k: statistics.fmean(v) for k, v in fill.items()},
        },
        "scope_inputs": scope,
        "warm_s": warm_s,
        **index_record(index, projection, candidates_per_direction=settings.candidates,
                       scoring_batch_size=settings.scoring_batch_size),
        "score_note": "per query: index search (pipeline.candidates) + exact scoring of the "
        "union (pipeline.score_examples); non-candidates scored by the projected estimate",
    }
    # the same s_test as pairdots_low_rank, and the same exact scores as the shared pass
    rec.update(s_test_check(ctx, xs))
    sc = pass_low_rank_scores(ctx)
    if sc is not None:
        rec["exact_vs_pass_max_rel_diff"] = max(
            float((scores[c, j] - sc[c, j]).abs().max() / sc[:, j].abs().max())
            for j, c in enumerate(torch.tensor(c) for c in cands)
        )
    return rec


def index_record(index: Any, projection: Any, **settings: Any) -> dict[str, Any]:
    """The settings and fit note shared by the index-based pairdots records."""
    return {
        "settings": {"solver": "low_rank", **settings, "index": index.describe(),
                     "projection": projection.describe()},
        "fit_note": "the bundle's low-rank factors and index, fitted / built at prepare time",
    }


def pass_low_rank_scores(ctx: Context) -> Tensor | None:
    """The shared pass's exact scores of pairdots_low_rank's s_tests [N, q], if cached."""
    if not (ctx.cache / "pass.pt").exists():
        return None
    ref = torch.load(ctx.cache / "pass.pt", weights_only=False)["scores"]
    return ref.get("pairdots_low_rank")


def method_sketch(ctx: Context, name: str) -> dict[str, Any]:
    """The index's estimate alone (module docstring): pipeline.s_test (low-rank), then the
    projection of s_test and one search of the bundle's index over all N (index_estimates),
    whose −⟨Pᵀs, Pᵀg_i⟩ is every example's score; no exact scoring. Timed per query end to
    end."""
    rt, args = ctx.rt, ctx.args
    if not rt.has_index or not is_available(rt, SolverChoice.LOW_RANK):
        return {"skipped": "the bundle has no index or no low-rank factors"}
    settings = served_settings(ctx)
    qg = ctx.prep()["qgrads"].to(rt.task.dtype)
    # what a warm server holds: the index and its projection, the low-rank factors
    t0 = time.perf_counter()
    index, projection = rt.index()
    rt.lowrank()
    warm_s = time.perf_counter() - t0
    n, nq = rt.n_train, qg.shape[1]
    scores = torch.empty(n, nq)
    walls: list[float] = []
    parts: dict[str, list[float]] = {"solve": [], "project": [], "search": []}
    xs: list[Tensor] = []
    for j in range(nq):
        t0 = time.perf_counter()
        x, _ = steps.s_test(rt, qg[:, j], settings, steps.no_stop)
        t1 = time.perf_counter()
        est, split = index_estimates(rt, x)
        t2 = time.perf_counter()
        walls.append(t2 - t0)
        parts["solve"].append(t1 - t0)
        for k, v in split.items():
            parts[k].append(v)
        if bool(est.isnan().any()):
            raise SystemExit(f"the index returned {int(est.isnan().sum())} of {n} examples short")
        scores[:, j] = est.float()
        xs.append(x.float())
    rec: dict[str, Any] = {
        "scores": scores,
        "fit_s": 0.0,
        "solve_s_per_query": statistics.fmean(parts["solve"]),
        "score_s": sum(w - s for w, s in zip(walls, parts["solve"])),
        "score_is_per_query": True,
        "queries": nq,
        "threads": args.threads,
        "s_per_query_end_to_end": statistics.fmean(walls),
        "s_per_query_end_to_end_per_query": walls,
        "breakdown_s_per_query": {k: statistics.fmean(v) for k, v in parts.items()},
        "warm_s": warm_s,
        **index_record(index, projection),
        "score_note": "per query: Pᵀs_test and one search of the index over all N "
        "(index_estimates); every score is the projected estimate −⟨Pᵀs, Pᵀg_i⟩, not rescaled",
    }
    rec.update(s_test_check(ctx, xs))
    # how well the estimate ranks like the exact scores of the same s_test (the shared pass)
    sc = pass_low_rank_scores(ctx)
    if sc is not None:
        per_q = [agreement(sc[:, j], scores[:, j]) for j in range(nq)]
        rec["vs_exact_low_rank_scores"] = {
            k: statistics.fmean(a[k] for a in per_q)
            for k in ("spearman_top100", "spearman_all", "top10_overlap")
        }
    # the same estimates pairdots_prefilter fills its non-candidates with
    pre = ctx.cache / "methods" / f"{PREFILTER}_t{args.threads}.pt"
    if pre.exists():
        r = torch.load(pre, weights_only=False)
        mask = torch.ones(n, nq, dtype=torch.bool)
        for j, c in enumerate(r["candidates"][:nq]):
            mask[torch.tensor(c), j] = False
        d = (r["scores"][:, :nq] - scores)[mask].abs().max()
        rec["vs_prefilter_fill_in_max_rel_diff"] = float(d / scores.abs().max())
    return rec


def dattri_task(ctx: Context, target: str = "margin") -> Any:
    from dattri.task import AttributionTask

    net = ctx.net

    def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        h, m, y = data
        return mean_ce(torch.func.functional_call(net, params, (h, m)), y)

    def f(params: dict[str, Tensor], data: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        h, m, y = data
        return margin(torch.func.functional_call(net, params, (h, m)), y).sum()

    return AttributionTask(
        loss_func=loss,
        model=net,
        checkpoints=net.state_dict(),
        target_func=f if target == "margin" else loss,
    )


def method_dattri(ctx: Context, name: str) -> dict[str, Any]:
    """dattri's IF attributors (CG, Arnoldi, LiSSA) on the true Hessian of the mean loss over the
    Hessian subset (one batch), damping δ; their transform of the query gradients is the vector
    scored by the shared pass. (dattri's own `attribute` re-runs the query transform for every
    training batch; calling cache / generate_test_rep / transform_test_rep once is the same
    arithmetic.)"""
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorLiSSA,
    )

    prep, args = ctx.prep(), ctx.args
    delta = prep["delta"]
    task = dattri_task(ctx)
    nq = len(ctx.queries) if name == "dattri_arnoldi" else min(args.slow_queries, len(ctx.queries))
    settings: dict[str, Any]
    if name == "dattri_cg":
        settings = {"max_iter": args.dattri_cg_iters, "regularization": delta}
        att = IFAttributorCG(task, **settings)
    elif name == "dattri_arnoldi":
        settings = {
            "proj_dim": args.arnoldi_dim,
            "max_iter": args.arnoldi_iters,
            "regularization": delta,
        }
        att = IFAttributorArnoldi(task, **settings)
    else:
        scaling = 1.5 * prep["lam_max"]
        settings = {
            "batch_size": args.lissa_batch,
            "recursion_depth": args.lissa_depth,
            "num_repeat": 1,
            "scaling": scaling,
            "damping": delta / scaling,
        }
        att = IFAttributorLiSSA(task, **settings)
    # one batch: the whole subset
    hess = loader(ctx.hessian_rows(), len(ctx.subset), listed=name == "dattri_arnoldi")
    h, m, y = ctx.query_batch(nq)
    qg = prep["qgrads"][:, :nq]
    # probe first: what one HVP costs, so a method that cannot fit --dattri-cap-s is recorded
    # with its measured cost instead of being run (CG with max_iter=1 is one HVP on the subset;
    # LiSSA's probe is 5 of its recursion steps on batches of lissa_batch)
    if name == "dattri_lissa":
        probe = IFAttributorLiSSA(task, **{**settings, "recursion_depth": 5})
        steps, per = 5, args.lissa_depth * nq
    else:
        probe = IFAttributorCG(task, max_iter=1, regularization=delta)
        steps = 1
        per = args.dattri_cg_iters * nq if name == "dattri_cg" else args.arnoldi_iters
    probe.cache(hess)
    t0 = time.perf_counter()
    probe.transform_test_rep(0, qg[:, :1].T.contiguous())
    step_s = (time.perf_counter() - t0) / steps
    projected = step_s * per
    measured = {
        "seconds_per_hvp_step": step_s,
        "hvp_steps_needed": per,
        "projected_seconds": projected,
        "cap_seconds": args.dattri_cap_s,
    }
    log(f"{name}: one HVP step {step_s:.1f} s; {per} steps ≈ {projected:.0f} s")
    if projected > args.dattri_cap_s:
        return {
            "skipped": f"over the time cap: one HVP step on the Hessian subset took "
            f"{step_s:.1f} s (measured), {per} steps needed ≈ {projected:.0f} s > "
            f"{args.dattri_cap_s:.0f} s",
            "measured": measured,
            "settings": settings,
        }
    t0 = time.perf_counter()
    att.cache(hess)
    fit_s = time.perf_counter() - t0
    test_rep = att.generate_test_rep(0, (h[None], m[None], y[None])).detach()  # [Q,P]
    grad_check = float((test_rep.T - qg).norm() / qg.norm())
    t0 = time.perf_counter()
    if name == "dattri_arnoldi":
        proj = att.arnoldi_projectors[0]
        # the projector is linear: ⟨P g, P q⟩ = ⟨g, Pᵀ P q⟩, so x = Pᵀ(P q) scores like it
        pq = proj(test_rep)
        vjp = torch.func.vjp(proj, test_rep)[1]
        x = vjp(pq)[0].T
    else:  # one query at a time: dattri vmaps its HVPs over the rows given (memory)
        x = torch.cat([att.transform_test_rep(0, test_rep[j : j + 1]) for j in range(nq)]).T
    solve_s = (time.perf_counter() - t0) / nq
    x = x.detach().float()
    t0 = time.perf_counter()
    scores = jvp_scores(ctx, x)  # the agreement; its cost is charged as the shared pass's
    return {
        "scores": scores,
        "jvp_score_s": time.perf_counter() - t0,
        "vectors": x,
        "fit_s": fit_s,
        "solve_s_per_query": solve_s,
        "queries": nq,
        "settings": settings,
        "query_grad_check": grad_check,
        "probe": measured,
        "curvature": "true Hessian of the mean CE over the Hessian subset (dattri)",
    }


# -- methods with their own scoring pass --------------------------------------------------------
def method_kronfluence(ctx: Context, name: str) -> dict[str, Any]:
    """Kronfluence 1.0.1 EK-FAC over the scope's Linear modules (LayerNorm weights are not
    tracked by Kronfluence): factors fitted on the Hessian subset (its defaults: true Fisher
    with sampled labels), damping δ, pairwise scores for all N training examples."""
    import kronfluence as kf
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    prep = ctx.prep()

    class KTask(kf.Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Tensor:
            h, m, y = batch
            logits = model(h, m)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Tensor:
            h, m, y = batch
            return margin(model(h, m), y).sum()

        def get_attention_mask(self, batch: Any) -> Tensor:
            return batch[1]

    task = KTask()
    model = prepare_model(ctx.net, task)
    out = ctx.cache / "kronfluence"
    analyzer = Analyzer(
        "peers",
        model,
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(out),
        log_level=logging.WARNING,
    )
    dl = DataLoaderKwargs(collate_fn=collate)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        analyzer.fit_all_factors(
            "f",
            ctx.hessian_rows(),
            per_device_batch_size=32,
            dataloader_kwargs=dl,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
    fit_s = time.perf_counter() - t0
    queries = [(q[0][0], q[2]) for q in ctx.queries]

    class QRows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(queries)

        def __getitem__(self, k: int) -> tuple[Tensor, int]:
            return queries[k]

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        analyzer.compute_pairwise_scores(
            "s",
            "f",
            QRows(),
            ctx.train_rows(),
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=32,
            dataloader_kwargs=dl,
            score_args=ScoreArguments(damping_factor=prep["delta"]),
            overwrite_output_dir=True,
        )
    score_s = time.perf_counter() - t0
    scores = analyzer.load_pairwise_scores("s")["all_modules"]  # [Q, N sorted]
    return {
        "scores": ctx.unsort(-scores.T.float()),
        "fit_s": fit_s,
        "solve_s_per_query": 0.0,
        "score_s": score_s,
        "queries": len(queries),
        "settings": {
            "strategy": "ekfac",
            "damping_factor": prep["delta"],
            "use_empirical_fisher": False,
            "tracked": "the scope's nn.Linear",
        },
        "score_note": "preconditioning the queries is inside the scoring pass",
    }


def method_tracincpfast(ctx: Context, name: str) -> dict[str, Any]:
    """Captum TracInCPFast: gradient dot products over the final fully connected layer only
    (the classifier, 770 parameters; Captum's fast form), one checkpoint (the served model),
    no curvature. test_loss_fn = the margin, so scores are ∇m_yᵀ∇L(z) over that layer."""
    from captum.influence import TracInCPFast

    ckpt = ctx.cache / "scope-checkpoint.pt"
    torch.save(ctx.net.state_dict(), ckpt)

    class Margin(torch.nn.Module):
        reduction = "sum"

        def forward(self, logits: Tensor, y: Tensor) -> Tensor:
            return margin(logits, y).sum()

    ce = torch.nn.CrossEntropyLoss(reduction="sum")
    train = loader(ctx.train_rows(), 64)
    t0 = time.perf_counter()
    tracin = TracInCPFast(
        ctx.net,
        ctx.net.classifier,
        train,
        [str(ckpt)],
        checkpoints_load_func=lambda mdl, p: (mdl.load_state_dict(torch.load(p)), 1.0)[1],
        loss_fn=ce,
        batch_size=64,
        test_loss_fn=Margin(),
    )
    fit_s = time.perf_counter() - t0
    h, m, y = ctx.query_batch()
    t0 = time.perf_counter()
    scores = tracin.influence((h, m, y))  # [Q, N sorted]
    score_s = time.perf_counter() - t0
    return {
        "scores": ctx.unsort(-scores.T.float()),
        "fit_s": fit_s,
        "solve_s_per_query": 0.0,
        "score_s": score_s,
        "queries": len(ctx.queries),
        "settings": {"final_fc_layer": "classifier", "checkpoints": 1},
    }


METHODS: dict[str, Callable[[Context, str], dict[str, Any]]] = {
    **{m: method_pairdots for m in PAIRDOTS},
    PREFILTER: method_prefilter,
    SKETCH: method_sketch,
    "dattri_cg": method_dattri,
    "dattri_arnoldi": method_dattri,
    "dattri_lissa": method_dattri,
    "kronfluence_ekfac": method_kronfluence,
    "captum_tracincpfast": method_tracincpfast,
}


# -- the shared pass ----------------------------------------------------------------------------
def phase_pass(ctx: Context) -> None:
    """Per-example gradients of every training example (pairdots' per_example_loss_grads, the
    same ∇θL(z_i) dattri's generate_train_rep computes: checked on the first batch) times the
    stacked query-side vectors: I = −G X for every method at once."""
    prep = ctx.prep()
    blocks: dict[str, Tensor] = {"reference": prep["s_ref"]}
    for name in PAIRDOTS:
        p = ctx.cache / "methods" / f"{name}.pt"
        if p.exists():
            rec = torch.load(p, weights_only=False)
            if "vectors" in rec:
                blocks[name] = rec["vectors"]
    names = list(blocks)
    stacked = torch.cat([blocks[k] for k in names], 1)  # [P, M]
    widths = [blocks[k].shape[1] for k in names]
    params = {k: v.detach() for k, v in ctx.rt.params.items()}
    bs = ctx.args.batch_size
    # resumable: progress saved every 20 batches (a hold of the shared lock may end mid-pass)
    part_path = ctx.cache / "pass_part.pt"
    part = torch.load(part_path, weights_only=False) if part_path.exists() else None
    if part is None or part["names"] != names or part["batch_size"] != bs:
        part = {
            "names": names,
            "batch_size": bs,
            "out": torch.zeros(ctx.n, stacked.shape[1]),
            "next": 0,
            "seconds": 0.0,
            "check": None,
        }
    out = part["out"]
    t0 = time.perf_counter()
    check = part["check"]
    for b in range(part["next"], ctx.n, bs):
        idx = ctx.order[b : b + bs]
        h, m = pad([ctx.hidden[i] for i in idx])
        y = torch.tensor([ctx.labels[i] for i in idx])
        g = per_example_loss_grads(ctx.fn, params, h, m, y, vmap_mask=VmapMask.BINARY_2D)
        if check is None:
            task = dattri_task(ctx)
            from dattri.algorithm.base import BaseInnerProductAttributor

            class _Raw(BaseInnerProductAttributor):
                pass

            dg = _Raw(task).generate_train_rep(0, (h[None], m[None], y[None]))
            check = float((dg - g).norm() / g.norm())
            log(f"dattri generate_train_rep vs pairdots per_example_loss_grads: {check:.2e}")
        out[idx] = -(g.float() @ stacked)
        if (b // bs) % 20 == 19:
            part.update(
                next=b + bs, check=check, seconds=part["seconds"] + time.perf_counter() - t0
            )
            t0 = time.perf_counter()
            torch.save(part, part_path)
            log(f"  pass {b + bs}/{ctx.n} ({part['seconds']:.0f} s)")
    pass_s = part["seconds"] + time.perf_counter() - t0
    scores, c = {}, 0
    for k, w in zip(names, widths):
        scores[k] = out[:, c : c + w]
        c += w
    torch.save(
        {
            "scores": scores,
            "pass_s": pass_s,
            "train_rep_check": check,
            "peak_rss_mb": peak_rss_mb(),
            "batch_size": bs,
        },
        ctx.cache / "pass.pt",
    )
    part_path.unlink(missing_ok=True)
    log(f"pass over {ctx.n} examples for {names}: {pass_s:.0f} s")


# -- report --------------------------------------------------------------------------------------
def phase_report(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache)
    prep = torch.load(cache / "prep.pt", weights_only=False)
    shared = torch.load(cache / "pass.pt", weights_only=False)
    ref = shared["scores"]["reference"]  # [N, Q]
    nq = ref.shape[1]
    rows: dict[str, Any] = {}
    for name in expand_names(cache, args.methods.split(",")) + list(NOT_RUN):
        if name in NOT_RUN:
            rows[name] = {"status": NOT_RUN[name]}
            continue
        p = cache / "methods" / f"{name}.pt"
        if not p.exists():
            rows[name] = {"status": "not run (no result cached)"}
            continue
        rec = torch.load(p, weights_only=False)
        if "skipped" in rec:
            rows[name] = {"status": "skipped: " + rec["skipped"], **rec}
            continue
        if name in shared["scores"]:
            sc, score_s = shared["scores"][name], shared["pass_s"]
        elif "scores" in rec:
            # query-side methods scored in their own child (jvp): their scoring cost is the
            # shared pass of per-example gradients, which is what the library itself runs
            sc = rec["scores"]
            score_s = shared["pass_s"] if "vectors" in rec else rec["score_s"]
        else:
            rows[name] = {"status": "vectors cached; rerun the pass"}
            continue
        q = sc.shape[1]
        per_q = [agreement(ref[:, j], sc[:, j]) for j in range(q)]
        row: dict[str, Any] = {
            "queries": q,
            "fit_s": rec["fit_s"],
            "solve_s_per_query": rec["solve_s_per_query"],
            "score_s_all_queries": score_s,
            "peak_rss_mb": max(
                rec["peak_rss_mb"], shared["peak_rss_mb"] if "vectors" in rec else 0.0
            ),
            "settings": rec.get("settings"),
        }
        for key in ("spearman_top100", "spearman_all", "top10_overlap"):
            vals = [a[key] for a in per_q]
            row[key] = statistics.fmean(vals)
            row[key + "_per_query"] = vals
        # one query alone: fit + solve + a scoring pass (its own share where scoring is per
        # query: pairdots_prefilter); amortised over the run's queries
        one_score_s = score_s / q if rec.get("score_is_per_query") else score_s
        row["s_per_query_single"] = rec["fit_s"] + rec["solve_s_per_query"] + one_score_s
        row["s_per_query_amortised"] = (rec["fit_s"] + score_s) / q + rec["solve_s_per_query"]
        if name == "pairdots_diagonal" and "jvp_scores" in rec:
            row["explain_path_score_s_per_query"] = rec["score_s_per_query"]
            row["s_per_query_explain_path"] = rec["solve_s_per_query"] + rec["score_s_per_query"]
            jv = rec["jvp_scores"]
            row["jvp_vs_pass_max_rel_diff"] = float(
                (jv - sc[:, : jv.shape[1]]).abs().max() / sc[:, : jv.shape[1]].abs().max()
            )
        if "candidates" in rec:  # what Explain returns: the top 10 among the candidates
            vals = []
            for j, ids in enumerate(rec["candidates"]):
                at = torch.tensor(ids)
                got = at[sc[at, j].argsort(descending=True)[:10]].tolist()
                want = ref[:, j].argsort(descending=True)[:10].tolist()
                vals.append(len(set(got) & set(want)) / 10)
            row["top10_overlap_candidates_only"] = statistics.fmean(vals)
        for k in (
            "query_grad_check",
            "curvature",
            "fit_note",
            "score_note",
            "threads",
            "s_per_query_end_to_end",
            "breakdown_s_per_query",
            "candidates_per_direction",
            "candidates_scored_mean",
            "fill_in",
            "scope_inputs",
            "warm_s",
            "s_test_vs_pairdots_low_rank_max_rel_diff",
            "exact_vs_pass_max_rel_diff",
            "vs_exact_low_rank_scores",
            "vs_prefilter_fill_in_max_rel_diff",
            "load_average_after",
        ):
            if k in rec:
                row[k] = rec[k]
        rows[name] = row
    done = {k: v for k, v in rows.items() if "fit_s" in v}
    base = done.get("pairdots_diagonal")
    if base is not None:
        for v in done.values():
            v["amortised_time_vs_pairdots_diagonal"] = (
                v["s_per_query_amortised"] / base["s_per_query_amortised"]
            )
    peers = {k: v for k, v in done.items() if not k.startswith("pairdots")}
    versus: dict[str, Any] = {}
    if base is not None and peers:
        fastest = min(peers, key=lambda k: peers[k]["s_per_query_amortised"])
        versus = {
            "fastest_peer": fastest,
            "its_s_per_query_amortised": peers[fastest]["s_per_query_amortised"],
            "pairdots_diagonal_s_per_query_amortised": base["s_per_query_amortised"],
            "speedup_amortised": peers[fastest]["s_per_query_amortised"]
            / base["s_per_query_amortised"],
            "fastest_peer_single_query_s": peers[fastest]["s_per_query_single"],
            "pairdots_explain_path_single_query_s": base.get("s_per_query_explain_path"),
        }
    # the served path and the sketch against every peer (fastest first): speed-up (the peer's
    # amortised s/query over this row's) and whether its agreement is equal or better on all
    # three metrics, with the metrics where it is worse
    metrics = ("spearman_top100", "spearman_all", "top10_overlap")
    for family in PER_CONFIG:
        own = {k: v for k, v in done.items() if k.startswith(family + "_")}
        if not (own and peers):
            continue
        versus[family] = {}
        for k, v in own.items():
            vs: dict[str, Any] = {}
            for peer in sorted(peers, key=lambda p: peers[p]["s_per_query_amortised"]):
                worse = [m for m in metrics if v[m] < peers[peer][m]]
                vs[peer] = {
                    "speedup_amortised": peers[peer]["s_per_query_amortised"]
                    / v["s_per_query_amortised"],
                    "agreement_as_good": not worse,
                    "worse_on": worse,
                }
            fast = vs[min(peers, key=lambda p: peers[p]["s_per_query_amortised"])]
            vs["at_least_2x_faster_than_fastest_peer_at_as_good_agreement"] = (
                fast["speedup_amortised"] >= 2.0 and fast["agreement_as_good"]
            )
            versus[family][k] = vs
    return {
        "pairdots_vs_fastest_peer": versus,
        "bundle": args.bundle,
        "queries": nq,
        "query_texts": prep["query_texts"],
        "training_examples": int(ref.shape[0]),
        "scope_parameters": int(prep["qgrads"].shape[0]),
        "hessian_examples": len(prep["subset"]),
        "measurement": "m_y, logit margin of the predicted label",
        "reference": prep["reference"],
        "versions": versions(),
        "threads": args.threads,
        "shared_pass_s": shared["pass_s"],
        "train_rep_check": shared["train_rep_check"],
        "methods": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    log(
        f"{'method':27} {'q':>3} {'fit s':>8} {'solve s/q':>9} {'score s':>8} {'s/q amort':>9} "
        f"{'×pd':>6} {'RSS MB':>7} {'ρ top100':>8} {'ρ all':>6} {'top10':>5}"
    )
    if result["pairdots_vs_fastest_peer"]:
        log(f"pairdots (diagonal) vs the fastest peer: {result['pairdots_vs_fastest_peer']}")
    for name, r in result["methods"].items():
        if "fit_s" not in r:
            log(f"{name:27} {r['status']}")
            continue
        log(
            f"{name:27} {r['queries']:>3} {r['fit_s']:>8.1f} {r['solve_s_per_query']:>9.2f} "
            f"{r['score_s_all_queries']:>8.1f} {r['s_per_query_amortised']:>9.2f} "
            f"{r.get('amortised_time_vs_pairdots_diagonal', math.nan):>6.2f} "
            f"{r['peak_rss_mb']:>7.0f} {r['spearman_top100']:>8.3f} {r['spearman_all']:>6.3f} "
            f"{r['top10_overlap']:>5.2f}"
        )


# -- driver -------------------------------------------------------------------------------------
def child(args: argparse.Namespace, phase: str, method: str | None = None) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase]
    if method:
        cmd += ["--method", method]
    for k in (
        "bundle",
        "cache",
        "inputs",
        "queries",
        "hessian_examples",
        "hessian_seed",
        "damping_scale",
        "threads",
        "batch_size",
        "slow_queries",
        "jvp_queries",
        "dattri_cg_iters",
        "dattri_cap_s",
        "arnoldi_dim",
        "arnoldi_iters",
        "lissa_batch",
        "lissa_depth",
        "prefilter_candidates",
    ):
        cmd += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    log(f"--- {phase} {method or ''}")
    return subprocess.run(cmd, check=False).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="bundles/minilm-sst2")
    ap.add_argument(
        "--phase", default="all", choices=["all", "prepare", "method", "pass", "report"]
    )
    ap.add_argument("--method", default=None)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--cache", default=None, help="default /var/tmp/pairdots-peers/<bundle>")
    ap.add_argument(
        "--inputs",
        default=None,
        help="bench/faithfulness.py cache with inputs.pt (default "
        "/var/tmp/pairdots-faithfulness/<bundle>)",
    )
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--hessian-examples", type=int, default=512)
    ap.add_argument("--hessian-seed", type=int, default=0)
    ap.add_argument("--damping-scale", type=float, default=0.01, help="δ = scale × λ_max(G)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="the shared pass")
    ap.add_argument(
        "--slow-queries",
        type=int,
        default=3,
        help="queries for dattri CG and LiSSA (a solve costs HVPs on the subset)",
    )
    ap.add_argument(
        "--jvp-queries", type=int, default=2, help="queries timed on pairdots' own jvp scoring path"
    )
    ap.add_argument("--dattri-cg-iters", type=int, default=10, help="dattri's default")
    ap.add_argument(
        "--dattri-cap-s",
        type=float,
        default=150.0,
        help="run a dattri solver only if its probed HVP cost fits this",
    )
    ap.add_argument("--arnoldi-dim", type=int, default=20)
    ap.add_argument("--arnoldi-iters", type=int, default=40)
    ap.add_argument("--lissa-batch", type=int, default=8)
    ap.add_argument("--lissa-depth", type=int, default=100)
    ap.add_argument(
        "--prefilter-candidates",
        type=int,
        default=0,
        help="pairdots_prefilter: index candidates per direction (0: the served default, "
        "clamp(2 %% · N, 50, 2000))",
    )
    ap.add_argument("--budget-min", type=float, default=16.0, help="start no method after it")
    ap.add_argument("--name", default="peers")
    args = ap.parse_args()
    bname = Path(args.bundle).name
    args.cache = args.cache or f"/var/tmp/pairdots-peers/{bname}"
    args.inputs = args.inputs or f"/var/tmp/pairdots-faithfulness/{bname}"
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.phase == "prepare":
        phase_prepare(Context(args))
    elif args.phase == "method":
        ctx = Context(args)
        if not (cache / "prep.pt").exists():
            phase_prepare(ctx)
        torch.manual_seed(0)
        for name in PAIRDOTS if args.method == "pairdots" else [args.method]:
            save(ctx, record_name(args, name), METHODS[name](ctx, name))
    elif args.phase == "pass":
        phase_pass(Context(args))
    elif args.phase == "all":
        t_start = time.perf_counter()

        def spent() -> bool:
            return time.perf_counter() - t_start > 60 * args.budget_min

        if not (cache / "prep.pt").exists():
            child(args, "prepare")
        names = args.methods.split(",")
        # pairdots' solvers in one child (one runtime load), the peers with their own scoring
        # pass, then the shared pass that scores pairdots and the reference, then dattri
        steps = ["pairdots"] if any(n in PAIRDOTS for n in names) else []
        steps += [n for n in names if n in OWN_PASS] + ["pass"]
        steps += [n for n in names if n not in PAIRDOTS and n not in OWN_PASS]
        for step in steps:
            if step == "pass":
                if (cache / "pass.pt").exists():
                    continue
            elif step == "pairdots":
                if all((cache / "methods" / f"{n}.pt").exists() for n in PAIRDOTS):
                    continue
            elif (cache / "methods" / f"{record_name(args, step)}.pt").exists():
                continue
            if spent():
                log(f"budget spent before {step}: rerun to continue")
                break
            rc = child(args, "pass") if step == "pass" else child(args, "method", step)
            if rc != 0:
                log(f"{step} failed (exit {rc})")
    if args.phase in ("all", "report") and (cache / "pass.pt").exists():
        result = phase_report(args)
        print_table(result)
        print(json.dumps({k: v for k, v in result.items() if k != "methods"}, default=str))
        log(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
