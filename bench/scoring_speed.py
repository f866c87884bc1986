"""Exact scoring paths side by side on a prepared bundle (issue 13, items 1–2), in one process
so that both sides of every ratio see the same machine load.

  scoring   I(z_i, f) = -⟨s_test, ∇θL(z_i)⟩ (Eq. 5) for --examples training examples:
            per-example gradients (core.grads.per_example_loss_grads, the path Explain used)
            against one jvp per batch (pipeline.score_examples, core/scoring.py);
  eq8       Eq. 8 word attributions of --eq8-examples training examples: one example at a time
            (pipeline.word_attribution) against all [UNK] copies batched
            (pipeline.word_attributions);
  sketch    projecting one s_test for the index query: the sparse sign sketch at k = 1024 and
            4096 against the Gaussian projection's blocked path at k = 1024 (what a Gaussian
            index pays per query when its 7.9 GB matrix is not cached) and its dense build.

s_test is the prediction-margin s_test of one SST-2 test sentence (the bundle's default
solver). Without --bundle: the packaged all-MiniLM-L6-v2 with a head fitted on --head SST-2
examples (bench/fidelity.load_minilm_problem, same scope, no bundle loaded), a random unit
s_test, and the core functions directly (core.grads vs core.scoring; Eq. 8:
core.influence.token_influence_exact per example vs core.scoring.token_influence_many). Agreement: max |Δ| / max |I| between the paths. Last line: one JSON object; also
bench/results/scoring_speed.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from _common import default_candidates, load_runtime, log, no_stop, sample_sentences
from _results import write_result

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.index.projection import GaussianProjection
from pairdots_server.index.sparse_sign import SparseSignProjection
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.settings import InfluenceSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="prepared bundle; default: raw MiniLM")
    ap.add_argument("--head", type=int, default=64, help="raw MiniLM: head-fit examples")
    ap.add_argument("--examples", type=int, default=256, help="training examples scored")
    ap.add_argument("--eq8-examples", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--gaussian-blocks",
        type=int,
        default=40,
        help="Gaussian blocks timed (of in_dim / 4096); the rest extrapolated",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.bundle is None:
        raw_main(args)
        return

    rt, load_s = load_runtime(args.bundle, args.threads)
    settings = InfluenceSettings().resolve(
        rt, default_candidates=default_candidates(rt.n_train), scoring_batch_size=args.batch_size
    )
    text = sample_sentences(1, args.seed)[0][0]
    enc = steps.encode_text(rt, text)
    label = int(steps.predict(rt, enc).argmax())
    m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
    s_test, diag = steps.measurement_s_test(rt, enc, m, settings, no_stop)
    log(f"bundle {rt.name}: P={rt.num_params}, s_test of {text[:50]!r} by {diag['method']}")
    idx = sorted(random.Random(args.seed).sample(range(rt.n_train), args.examples))

    # warm-up: torch.func's first jvp / vmap call pays a one-off set-up (about 2 s measured)
    t0 = time.perf_counter()
    steps.score_examples(rt, s_test, idx[:4], settings, no_stop)
    t_warm_jvp = time.perf_counter() - t0
    e = rt.encode_train(idx[:4])
    per_example_loss_grads(rt.task.logits_fn, rt.params, e.embeds, e.mask, e.labels)

    # scoring: per-example gradients (Explain's old path) vs jvp
    t0 = time.perf_counter()
    ref = []
    for b in range(0, len(idx), args.batch_size):
        e = rt.encode_train(idx[b : b + args.batch_size])
        g = per_example_loss_grads(rt.task.logits_fn, rt.params, e.embeds, e.mask, e.labels)
        ref.append(-(g @ s_test.to(g.dtype)).double())
    t_grad = time.perf_counter() - t0
    ref_t = torch.cat(ref)
    t0 = time.perf_counter()
    got = steps.score_examples(rt, s_test, idx, settings, no_stop)
    t_jvp = time.perf_counter() - t0
    err = float((got - ref_t).abs().max() / ref_t.abs().max())
    log(
        f"scoring {len(idx)}: gradients {t_grad:.2f}s, jvp {t_jvp:.2f}s "
        f"({t_grad / t_jvp:.1f}x), max |Δ|/max|I| {err:.2e}"
    )

    # Eq. 8: one example at a time vs all copies batched
    eq8_idx = idx[: args.eq8_examples]
    t0 = time.perf_counter()
    one = [
        steps.word_attribution(
            rt, s_test, steps.encode_train_example(rt, i), rt.bundle.train[i].label
        )
        for i in eq8_idx
    ]
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = steps.word_attributions(rt, s_test, eq8_idx)
    t_many = time.perf_counter() - t0
    scale = max(max(abs(v) for v in row) for row in one if row)
    err8 = (
        max(
            abs(a - b)
            for row, att in zip(one, many, strict=True)
            for a, b in zip(row, att.totals, strict=True)
        )
        / scale
    )
    log(
        f"eq8 {len(eq8_idx)} examples: one by one {t_one:.2f}s, batched {t_many:.2f}s "
        f"({t_one / t_many:.1f}x), max |Δ|/max {err8:.2e}"
    )

    # the index query's projection
    sketch: dict[str, float] = {}
    for k in (1024, 4096):
        t0 = time.perf_counter()
        sk = SparseSignProjection(rt.num_params, k, 0)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        sk.project(s_test[None].float())
        sketch[f"sparse_sign_{k}_init_s"] = t_init
        sketch[f"sparse_sign_{k}_query_s"] = time.perf_counter() - t0
    gauss = GaussianProjection(rt.num_params, 1024, 0, max_dense_bytes=0)
    blocks = min(args.gaussian_blocks, gauss.num_blocks)
    t0 = time.perf_counter()
    for b in range(blocks):
        gauss.block(b)
    per_block = (time.perf_counter() - t0) / blocks
    sketch["gaussian_1024_blocked_query_s_extrapolated"] = per_block * gauss.num_blocks
    sketch["gaussian_1024_matrix_bytes"] = float(gauss.matrix_bytes)
    log("projection: " + ", ".join(f"{k} {v:.3g}" for k, v in sketch.items()))

    result = {
        "bench": "scoring_speed",
        "bundle": rt.name,
        "scope_parameters": rt.num_params,
        "threads": args.threads,
        "load_seconds": load_s,
        "examples": len(idx),
        "batch_size": args.batch_size,
        "solver": diag["method"],
        "first_jvp_call_s": t_warm_jvp,
        "scoring_gradients_s": t_grad,
        "scoring_jvp_s": t_jvp,
        "scoring_speedup": t_grad / t_jvp,
        "scoring_max_rel_diff": err,
        "eq8_examples": len(eq8_idx),
        "eq8_one_by_one_s": t_one,
        "eq8_batched_s": t_many,
        "eq8_speedup": t_one / t_many,
        "eq8_max_rel_diff": err8,
        **sketch,
    }
    with open("/proc/loadavg") as fh:
        result["loadavg"] = fh.read().split()[:3]
    write_result("scoring_speed", result)
    print(json.dumps(result), flush=True)


def raw_main(args: argparse.Namespace) -> None:
    """The scoring and Eq. 8 comparisons on the packaged MiniLM (no bundle)."""
    from fidelity import load_minilm_problem

    from pairdots_server.core.influence import token_influence_exact
    from pairdots_server.core.scoring import Row, influence_jvp, token_influence_many

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    p = load_minilm_problem(None, args.examples, args.head)
    load_s = time.perf_counter() - t0
    fn = p.logits_fn  # type: ignore[assignment]
    n_params = sum(int(v.numel()) for v in p.params.values())
    s_test = torch.randn(n_params, generator=torch.Generator().manual_seed(args.seed))
    s_test /= s_test.norm()
    lengths = p.mask.sum(1).tolist()
    order = sorted(range(args.examples), key=lambda i: (lengths[i], i))

    def batches() -> list[list[int]]:
        return [order[b : b + args.batch_size] for b in range(0, len(order), args.batch_size)]

    def trim(ix: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = int(max(lengths[i] for i in ix))
        return p.embeds[ix, :t], p.mask[ix, :t], p.labels[ix]

    e, mk, y = trim(order[:4])  # warm-up of both paths
    t0 = time.perf_counter()
    influence_jvp(fn, p.params, s_test, e, mk, y)
    t_warm = time.perf_counter() - t0
    per_example_loss_grads(fn, p.params, e, mk, y)
    t0 = time.perf_counter()
    ref = torch.cat(
        [-(per_example_loss_grads(fn, p.params, *trim(ix)) @ s_test).double() for ix in batches()]
    )
    t_grad = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = torch.cat([influence_jvp(fn, p.params, s_test, *trim(ix)).double() for ix in batches()])
    t_jvp = time.perf_counter() - t0
    err = float((got - ref).abs().max() / ref.abs().max())
    log(
        f"raw MiniLM scoring {args.examples}: gradients {t_grad:.2f}s, jvp {t_jvp:.2f}s "
        f"({t_grad / t_jvp:.1f}x), max |Δ|/max|I| {err:.2e} (first jvp call {t_warm:.2f}s)"
    )

    ex = order[-args.eq8_examples :]  # the longest: most [UNK] copies
    rows = [
        Row(p.embeds[i, : int(lengths[i])], p.mask[i, : int(lengths[i])], int(p.labels[i]))
        for i in ex
    ]
    pos = [list(range(1, int(lengths[i]) - 1)) for i in ex]
    t0 = time.perf_counter()
    one = [
        token_influence_exact(
            fn, p.params, s_test, r.embeds[None], r.mask[None], r.label, p.unk_embed, q
        )
        for r, q in zip(rows, pos, strict=True)
    ]
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = token_influence_many(fn, p.params, s_test, rows, pos, p.unk_embed)
    t_many = time.perf_counter() - t0
    err8 = max(float((a - b).abs().max()) for a, b in zip(one, many, strict=True)) / max(
        float(a.abs().max()) for a in one
    )
    log(
        f"raw MiniLM eq8 {len(ex)} examples ({sum(map(len, pos))} copies): one by one "
        f"{t_one:.2f}s, batched {t_many:.2f}s ({t_one / t_many:.1f}x), max |Δ|/max {err8:.2e}"
    )
    result: dict[str, object] = {
        "bench": "scoring_speed",
        "model": p.source,
        "scope_parameters": n_params,
        "threads": args.threads,
        "load_seconds": load_s,
        "examples": args.examples,
        "batch_size": args.batch_size,
        "first_jvp_call_s": t_warm,
        "scoring_gradients_s": t_grad,
        "scoring_jvp_s": t_jvp,
        "scoring_speedup": t_grad / t_jvp,
        "scoring_max_rel_diff": err,
        "eq8_examples": len(ex),
        "eq8_copies": sum(map(len, pos)),
        "eq8_one_by_one_s": t_one,
        "eq8_batched_s": t_many,
        "eq8_speedup": t_one / t_many,
        "eq8_max_rel_diff": err8,
    }
    with open("/proc/loadavg") as fh:
        result["loadavg"] = fh.read().split()[:3]
    write_result("scoring_speed_raw_minilm", result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
