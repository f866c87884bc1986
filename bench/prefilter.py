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

Sparse-sign sketches (--sketch-dims k1 k2 ...): the exhaustive pass's gradients are also
sketched with index/sparse_sign.py at each k (the same rows a `pairdots index build
--index-projection sparse_sign --index-dim k` would store), searched exactly in memory, and
their recall reported next to the bundle's own index (--no-bundle-index skips that one: a
Gaussian index caches its 7.9 GB matrix). --write-index DIR --write-dim k writes the sketch
at k as an index directory (index/store.py format), so no second gradient pass is needed.
--margin also scores each sentence's prediction-margin s_test (Explain's default word-level and
prediction-level query; core/measure.grad_theta_margin).

Last line: one JSON object; also bench/results/prefilter.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

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
from _results import write_result
from torch import Tensor

from pairdots_server.index.exact import ExactIndex
from pairdots_server.index.recall import recall_at
from pairdots_server.index.sparse_sign import SparseSignProjection
from pairdots_server.index.store import IndexMeta, save_index_data
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.artifacts import train_grad_fn
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings


def exhaustive_influence(
    rt: ModelRuntime, s_tests: Tensor, batch_size: int,
    sketches: Sequence[SparseSignProjection] = (),
) -> tuple[Tensor, float, float, list[np.ndarray]]:
    """I [N,Q] = -G S for all training examples (G [N,P] in batches, S [P,Q]);
    also (seconds computing gradients, seconds in the products, and for each sketch the
    vectors [N, k] of G's rows sketched)."""
    n = rt.n_train
    grads = train_grad_fn(rt)  # the index build's gradients (through the scope split)
    out = torch.empty(n, s_tests.shape[1], dtype=torch.float64)  # [N,Q]
    sketched = [np.empty((n, sk.out_dim), dtype=np.float32) for sk in sketches]
    t_grad = t_mm = 0.0
    next_report = 0.1
    start = time.perf_counter()
    for b in range(0, n, batch_size):
        t0 = time.perf_counter()
        g = grads(range(b, min(b + batch_size, n)))  # [B,P]
        t1 = time.perf_counter()
        out[b : b + g.shape[0]] = -(g @ s_tests.to(g.dtype)).double()  # [B,Q]
        t_mm += time.perf_counter() - t1
        for sk, vec in zip(sketches, sketched, strict=True):
            vec[b : b + g.shape[0]] = sk.project(g).numpy()  # [B,k]
        t_grad += t1 - t0
        if (b + g.shape[0]) / n >= next_report:
            log(f"  exhaustive pass {b + g.shape[0]}/{n} ({time.perf_counter() - start:.0f}s)")
            next_report += 0.1
    return out, t_grad, t_mm, sketched


def sketch_ids(
    sk: SparseSignProjection, vectors: np.ndarray, s_tests: Tensor, k: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(supporting ids [k], opposing ids [k]) per query from an exact in-memory search of the
    sketched vectors, queried as pipeline.candidates does (∓ S s_test)."""
    index = ExactIndex(sk.out_dim)
    index.add(vectors, np.arange(vectors.shape[0], dtype=np.int64))
    q = sk.project(s_tests.T.float()).numpy()  # [Q,k_proj]
    _, sup = index.search(-q, k)
    _, opp = index.search(q, k)
    return [(sup[i], opp[i]) for i in range(q.shape[0])]


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


def margin_query(rt: ModelRuntime, q: WordQuery) -> WordQuery:
    """The same sentence's prediction-margin s_test (Explain's default word-level query)."""
    resolved = InfluenceSettings().resolve(rt, default_candidates=default_candidates(rt.n_train))
    enc = steps.encode_text(rt, q.text)
    m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, q.label)
    s_test, diag = steps.measurement_s_test(rt, enc, m, resolved, no_stop)
    return WordQuery(q.text, q.label, -1, "<margin>", s_test, diag)


def recall_table(
    queries: list[WordQuery], infl: Tensor, ids: list[tuple[np.ndarray, np.ndarray]],
    ks: list[int],
) -> dict[str, dict[str, dict[str, float]]]:
    """{"word": {K: row}, "margin": {K: row}} over the queries of each measurement."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("word", "margin"):
        cols = [i for i, q in enumerate(queries) if (q.word == "<margin>") == (name == "margin")]
        if cols:
            out[name] = {str(k): recall_row([queries[i] for i in cols], infl[:, cols],
                                            [ids[i] for i in cols], k) for k in ks}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="prepared bundle (with index/ unless "
                    "--no-bundle-index)")
    ap.add_argument("--sentences", type=int, default=20, help="SST-2 test sentences (≥ 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
    ap.add_argument("--candidates", type=int, nargs="*", default=None,
                    help="K per direction to evaluate (default: 0.5, 1, 2, 5, 10 %% of N)")
    ap.add_argument("--timed-sentences", type=int, default=5,
                    help="sentences on which prefilter search + exact scoring is timed")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="gradient batch size (Explain's scoring_batch_size)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--sketch-dims", type=int, nargs="*", default=[],
                    help="sparse-sign sketch dimensions to evaluate alongside")
    ap.add_argument("--sketch-seed", type=int, default=0)
    ap.add_argument("--no-bundle-index", action="store_true",
                    help="do not load or evaluate the bundle's own index")
    ap.add_argument("--margin", action="store_true",
                    help="also the prediction-margin s_test of every sentence")
    ap.add_argument("--write-index", default=None, help="write the sketch at --write-dim here")
    ap.add_argument("--write-dim", type=int, default=None)
    args = ap.parse_args()

    rt, load_s = load_runtime(args.bundle, args.threads)
    use_bundle = not args.no_bundle_index
    if use_bundle and not rt.has_index:
        raise SystemExit(f"{args.bundle}: the bundle has no index; run `pairdots index build` "
                         "or pass --no-bundle-index")
    n = rt.n_train
    k_default = default_candidates(n)
    ks = sorted(set(args.candidates or [max(1, round(f * n))
                                        for f in (0.005, 0.01, 0.02, 0.05, 0.10)]))
    ks = [min(k, n) for k in ks] + ([k_default] if k_default not in ks else [])
    ks = sorted(set(ks))
    k_large = max((k for k in ks if k <= 0.05 * n), default=min(ks))
    sketch_dims = sorted(set(args.sketch_dims + ([args.write_dim] if args.write_dim else [])))
    sketches = [SparseSignProjection(rt.num_params, d, args.sketch_seed) for d in sketch_dims]
    log(f"bundle {rt.name}: N={n}, scope P={rt.num_params}, sketches {sketch_dims}, "
        f"threads {args.threads}, loaded in {load_s:.1f}s")

    # 1. s_test for the top word of each sentence (and its margin)
    t0 = time.perf_counter()
    queries = []
    for text, _gold in sample_sentences(args.sentences, args.seed):
        q = top_word_query(rt, text)
        queries.append(q)
        log(f"  [{len(queries):2d}] {q.word!r:>14} in {text[:60]!r} "
            f"(solver {q.solver['method']}, ‖s‖={q.solver['norm']:.3g})")
        if args.margin:
            queries.append(margin_query(rt, q))
    log(f"s_test for {len(queries)} queries in {time.perf_counter() - t0:.1f}s")
    s_mat = torch.stack([q.s_test for q in queries], dim=1)  # [P,Q]

    # 2. exhaustive exact influence: one gradient pass over all N (sketched on the way)
    log(f"exhaustive exact influence over all {n} training examples...")
    infl, t_grad, t_mm, sketched = exhaustive_influence(rt, s_mat, args.batch_size, sketches)
    exhaustive_per_query = t_grad + t_mm / len(queries)
    log(f"  gradients {t_grad:.1f}s + products {t_mm:.2f}s -> {exhaustive_per_query:.1f}s "
        "per query")
    if args.write_index:
        at = sketch_dims.index(args.write_dim)
        meta = IndexMeta.for_projection(sketches[at], count=n, scope=rt.task.scope.describe())
        out = save_index_data(Path(args.write_index), np.arange(n, dtype=np.int64),
                              sketched[at], meta)
        log(f"  sparse-sign index k={args.write_dim} written to {out}")

    # 3. recall for each K: the sketches, then the bundle's index
    sketch_tables = {}
    for sk, vec in zip(sketches, sketched, strict=True):
        ids_sk = sketch_ids(sk, vec, s_mat, max(ks))
        sketch_tables[str(sk.out_dim)] = recall_table(queries, infl, ids_sk, ks)
        for name, rows_m in sketch_tables[str(sk.out_dim)].items():
            r = rows_m[str(k_default)]
            log(f"  sparse-sign k={sk.out_dim:5d} {name:>6}: K={k_default} recall@10 "
                f"{r['recall_at_10']:.3f} (min {r['recall_at_10_min']:.2f}) recall@100 "
                f"{r['recall_at_100']:.3f}, scored {r['scored_mean']:.0f}")
    result: dict[str, object] = {
        "bench": "prefilter",
        "bundle": rt.name,
        "n_train": n,
        "scope_parameters": rt.num_params,
        "sentences": args.sentences,
        "queries": len(queries),
        "solver": sorted({str(q.solver["method"]) for q in queries}),
        "threads": args.threads,
        "default_candidates": k_default,
        "exhaustive_seconds_per_query": exhaustive_per_query,
        "exhaustive_gradient_seconds": t_grad,
        "sparse_sign": {"seed": args.sketch_seed, "by_dim": sketch_tables,
                        "bytes": {str(sk.out_dim): sk.matrix_bytes for sk in sketches}},
    }
    if use_bundle:
        result.update(bundle_index_rows(rt, args, queries, infl, ks, k_default, k_large,
                                        exhaustive_per_query))
    write_result("prefilter", result)
    print(json.dumps(result, default=str), flush=True)


def bundle_index_rows(
    rt: ModelRuntime, args: argparse.Namespace, queries: list[WordQuery], infl: Tensor,
    ks: list[int], k_default: int, k_large: int, exhaustive_per_query: float,
) -> dict[str, object]:
    """Recall and timing of the bundle's own index (as before the sparse sketch)."""
    n = rt.n_train
    index, projection = rt.index()
    ids = [search_ids(rt, q.s_test, max(ks)) for q in queries]
    rows = {k: recall_row(queries, infl, ids, k) for k in ks}

    # time search + exact scoring at the default and largest-≤5 % K (Explain's own code)
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

    return {
        "projection_dim": projection.out_dim,
        "projection": projection.describe(),
        "index": index.describe(),
        "timed_sentences": len(timing[k_default]),
        "max_rel_score_error": max_err,
        **point(k_default),
        "default": point(k_default),
        "largest_le_5pct": point(k_large),
        "table": {str(k): {key: rows[k][key] for key in (
            "recall_at_10", "recall_at_100", "recall_at_10_dir", "recall_at_100_dir",
            "scored_mean")} for k in ks},
    }


if __name__ == "__main__":
    main()
