"""Recall and speedup of the gradient prefilter (issue 4, docs/DESIGN.md §3 "Prefilter").

For each of --sentences seeded SST-2 test sentences, the top salient word w (Explain's choice,
bench/_common.top_word_query) and s_test = (H + δI)⁻¹ ∇θ w from the bundle's default solver.

Exhaustive reference: I(z_i, w) = -⟨s_test, ∇θ L(z_i)⟩ (paper Eq. 5) for EVERY training
example. The per-example gradients are computed once, in batches (the same batch size and code
as Explain's exact scoring), and multiplied by all s_test at once: [B,P] @ [P,Q] -> [B,Q].

Prefilter: the index searched with -Pᵀs_test (supporting: ⟨-s_test, g⟩ large) and +Pᵀs_test
(opposing), K per direction; Explain scores the union of both lists exactly.
  recall@m (supporting) = |top-m by +I ∩ union| / m; recall@m (opposing): top-m by -I.
  recall_at_m = mean over sentences and the two directions. The `_dir` variants count only
  the list searched for that direction.

Speedup = exhaustive time per query / (search + exact scoring of the union) per query:
  exhaustive per query = gradient time of the full pass + its [N,P]@[P,Q] product / Q (one
  query needs one full gradient pass); prefilter = pipeline.candidates + pipeline.score_examples
  (Explain's own code), timed on the first --timed-sentences sentences at the default K and the
  largest K ≤ 5 % of N. Both in this run, same threads.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from _common import (
    WordQuery,
    default_candidates,
    load_runtime,
    log,
    no_stop,
    sample_sentences,
    summary,
    top_word_query,
)
from torch import Tensor

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.index.recall import recall_at
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings


def exhaustive_influence(
    rt: ModelRuntime, s_tests: Tensor, batch_size: int
) -> tuple[Tensor, float, float]:
    """I [N,Q] = -G S for all training examples (G [N,P] in batches, S [P,Q]);
    also (seconds computing gradients, seconds in the products)."""
    n = rt.n_train
    out = torch.empty(n, s_tests.shape[1], dtype=torch.float64)  # [N,Q]
    t_grad = t_mm = 0.0
    next_report = 0.1
    start = time.perf_counter()
    for b in range(0, n, batch_size):
        t0 = time.perf_counter()
        enc = rt.encode_train(range(b, min(b + batch_size, n)))
        g = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask,
                                   enc.labels)  # [B,P]
        t1 = time.perf_counter()
        out[b : b + g.shape[0]] = -(g @ s_tests.to(g.dtype)).double()  # [B,Q]
        t_mm += time.perf_counter() - t1
        t_grad += t1 - t0
        if (b + g.shape[0]) / n >= next_report:
            log(f"  exhaustive pass {b + g.shape[0]}/{n} ({time.perf_counter() - start:.0f}s)")
            next_report += 0.1
    return out, t_grad, t_mm


def search_ids(rt: ModelRuntime, s_test: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(supporting ids [k], opposing ids [k]) from the index, as pipeline.candidates queries it."""
    index, projection = rt.index()
    q = projection.project(s_test[None].float()).cpu().numpy()  # [1,k_proj]
    _, sup = index.search(-q, k)
    _, opp = index.search(q, k)
    return sup[0], opp[0]


def recall_row(
    queries: list[WordQuery], infl: Tensor, ids: list[tuple[np.ndarray, np.ndarray]], k: int
) -> dict[str, float]:
    """Mean recall@10/@100 (union and per direction) and mean union size at K per direction."""
    acc: dict[str, list[float]] = {}
    sizes = []
    for qi in range(len(queries)):
        col = infl[:, qi]
        sup_rank = torch.argsort(col, descending=True, stable=True).tolist()
        opp_rank = torch.argsort(col, descending=False, stable=True).tolist()
        sup_k, opp_k = ids[qi][0][:k], ids[qi][1][:k]
        union = sorted({int(i) for i in np.concatenate([sup_k, opp_k]) if i >= 0})
        sizes.append(len(union))
        for m in (10, 100):
            for name, rank, own in (("sup", sup_rank, sup_k), ("opp", opp_rank, opp_k)):
                acc.setdefault(f"{name}_{m}", []).append(recall_at(union, rank, m))
                acc.setdefault(f"{name}_{m}_dir", []).append(recall_at(own, rank, m))
    row = {key: statistics.fmean(v) for key, v in acc.items()}
    for m in (10, 100):
        row[f"recall_at_{m}"] = (row[f"sup_{m}"] + row[f"opp_{m}"]) / 2
        row[f"recall_at_{m}_dir"] = (row[f"sup_{m}_dir"] + row[f"opp_{m}_dir"]) / 2
        row[f"recall_at_{m}_min"] = min(acc[f"sup_{m}"] + acc[f"opp_{m}"])
    row["scored_mean"] = statistics.fmean(sizes)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="prepared bundle with index/ (and low-rank)")
    ap.add_argument("--sentences", type=int, default=20, help="SST-2 test sentences (≥ 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
    ap.add_argument("--candidates", type=int, nargs="*", default=None,
                    help="K per direction to evaluate (default: 0.5, 1, 2, 5, 10 %% of N)")
    ap.add_argument("--timed-sentences", type=int, default=5,
                    help="sentences on which prefilter search + exact scoring is timed")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="gradient batch size (Explain's scoring_batch_size)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()

    rt, load_s = load_runtime(args.bundle, args.threads)
    if not rt.has_index:
        raise SystemExit(f"{args.bundle}: the bundle has no index; run `pairdots index build`")
    n = rt.n_train
    index, projection = rt.index()
    k_default = default_candidates(n)
    ks = sorted(set(args.candidates or [max(1, round(f * n))
                                        for f in (0.005, 0.01, 0.02, 0.05, 0.10)]))
    ks = [min(k, n) for k in ks] + ([k_default] if k_default not in ks else [])
    ks = sorted(set(ks))
    k_large = max((k for k in ks if k <= 0.05 * n), default=min(ks))
    log(f"bundle {rt.name}: N={n}, scope P={rt.num_params}, index {index.describe()}, "
        f"projection dim {projection.out_dim}, threads {args.threads}, loaded in {load_s:.1f}s")

    # 1. s_test for the top word of each sentence
    t0 = time.perf_counter()
    queries = []
    for text, _gold in sample_sentences(args.sentences, args.seed):
        q = top_word_query(rt, text)
        queries.append(q)
        log(f"  [{len(queries):2d}] {q.word!r:>14} in {text[:60]!r} "
            f"(solver {q.solver['method']}, ‖s‖={q.solver['norm']:.3g})")
    log(f"s_test for {len(queries)} words in {time.perf_counter() - t0:.1f}s")
    s_mat = torch.stack([q.s_test for q in queries], dim=1)  # [P,Q]

    # 2. exhaustive exact influence: one gradient pass over all N
    log(f"exhaustive exact influence over all {n} training examples...")
    infl, t_grad, t_mm = exhaustive_influence(rt, s_mat, args.batch_size)
    exhaustive_per_query = t_grad + t_mm / len(queries)
    log(f"  gradients {t_grad:.1f}s + products {t_mm:.2f}s -> {exhaustive_per_query:.1f}s "
        "per query")

    # 3. recall for each K
    ids = [search_ids(rt, q.s_test, max(ks)) for q in queries]
    rows = {k: recall_row(queries, infl, ids, k) for k in ks}

    # 4. time search + exact scoring at the default and largest-≤5 % K (Explain's own code)
    timed_k = sorted({k_default, k_large})
    timing: dict[int, list[float]] = {k: [] for k in timed_k}
    max_err = 0.0
    for q_i, q in enumerate(queries[: args.timed_sentences]):
        for k in timed_k:
            timer = steps.Timer()
            settings = InfluenceSettings(use_index=True, candidates=k).resolve(
                rt, default_candidates=k, scoring_batch_size=args.batch_size
            )
            start = time.perf_counter()
            cand = steps.candidates(rt, q.s_test, settings, timer)
            scores = steps.score_examples(rt, q.s_test, cand, settings, no_stop, timer)
            timing[k].append(time.perf_counter() - start)
            sup, opp = ids[q_i][0][:k], ids[q_i][1][:k]
            expect = sorted({int(i) for i in np.concatenate([sup, opp]) if i >= 0})
            if cand != expect:
                raise SystemExit(f"pipeline.candidates disagrees with the search at K={k}")
            ref = infl[cand, q_i]
            err = float((scores.double() - ref).abs().max() / ref.abs().max())
            max_err = max(max_err, err)
        log(f"  timed query {q_i + 1}: " + ", ".join(
            f"K={k}: {timing[k][-1]:.2f}s" for k in timed_k))
    log(f"prefilter exact scores vs exhaustive: max |Δ| / max |I| = {max_err:.2e}")

    # table
    log("")
    log(f"{'K/dir':>6} {'% N':>6} {'scored':>7} {'% N':>6} | {'r@10':>5} {'sup':>5} {'opp':>5} "
        f"{'min':>5} | {'r@100':>5} {'sup':>5} {'opp':>5} | {'r@10d':>5} {'r@100d':>6} | "
        f"{'s/query':>7} {'speedup':>7}")
    for k in ks:
        r = rows[k]
        t = statistics.fmean(timing[k]) if k in timing else float("nan")
        log(f"{k:6d} {100 * k / n:6.2f} {r['scored_mean']:7.1f} "
            f"{100 * r['scored_mean'] / n:6.2f} | {r['recall_at_10']:5.3f} {r['sup_10']:5.3f} "
            f"{r['opp_10']:5.3f} {r['recall_at_10_min']:5.2f} | {r['recall_at_100']:5.3f} "
            f"{r['sup_100']:5.3f} {r['opp_100']:5.3f} | {r['recall_at_10_dir']:5.3f} "
            f"{r['recall_at_100_dir']:6.3f} | {t:7.2f} {exhaustive_per_query / t:7.1f}")
    log(f"exhaustive exact scoring: {exhaustive_per_query:.1f}s per query")

    def point(k: int) -> dict[str, object]:
        r = rows[k]
        t = statistics.fmean(timing[k])
        return {
            "candidates": k,
            "candidate_fraction": k / n,
            "scored_mean": r["scored_mean"],
            "scored_fraction": r["scored_mean"] / n,
            "recall_at_10": r["recall_at_10"],
            "recall_at_100": r["recall_at_100"],
            "recall_at_10_supporting": r["sup_10"],
            "recall_at_10_opposing": r["opp_10"],
            "recall_at_100_supporting": r["sup_100"],
            "recall_at_100_opposing": r["opp_100"],
            "recall_at_10_min": r["recall_at_10_min"],
            "recall_at_10_dir": r["recall_at_10_dir"],
            "recall_at_100_dir": r["recall_at_100_dir"],
            "prefilter_seconds_per_query": t,
            "prefilter_seconds": summary(timing[k]),
            "speedup": exhaustive_per_query / t,
        }

    solvers = {str(q.solver["method"]) for q in queries}
    result = {
        "bench": "prefilter",
        "bundle": rt.name,
        "n_train": n,
        "scope_parameters": rt.num_params,
        "projection_dim": projection.out_dim,
        "index": index.describe(),
        "sentences": len(queries),
        "timed_sentences": len(timing[k_default]),
        "solver": sorted(solvers),
        "threads": args.threads,
        "exhaustive_seconds_per_query": exhaustive_per_query,
        "exhaustive_gradient_seconds": t_grad,
        "max_rel_score_error": max_err,
        **point(k_default),
        "default": point(k_default),
        "largest_le_5pct": point(k_large),
        "table": {str(k): {key: rows[k][key] for key in (
            "recall_at_10", "recall_at_100", "recall_at_10_dir", "recall_at_100_dir",
            "scored_mean")} for k in ks},
    }
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
