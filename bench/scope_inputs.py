"""The scope-input cache and Eq. 8's cost on a prepared bundle (issue 13 items 1–2), in one
process so both sides of every ratio see the same machine load.

1. scope inputs (influence/scope_inputs.py): h_L of every training example computed once
   (seconds, bytes in float32 and float16); exact scoring I(z_i, f) = -⟨s_test, ∇θL(z_i)⟩
   (Eq. 5) of the default Explain's candidates (the index's K per direction, the prediction-
   margin s_test of --sentences SST-2 test sentences) by one jvp of the full model per batch
   (the path before) against one jvp of the scoped top from cached h_L (float32 and float16
   rows): seconds and max |Δ| / max |I|, and whether the top 10 each way is the same.
2. Eq. 8 (pipeline.word_attributions) on the examples the default Explain returns for each
   sentence (3 words × 5 examples each way + the prediction's): full exact with every
   [UNK] copy through the full model's jvp (the path before), full exact with the copies
   through the trunk without tangent and the jvp through the top (now), and the top-k words
   mode. Agreement: the responsible word (the largest Eq. 8 word influence in the example's
   direction, explain._responsible_word) of top-k mode vs full exact, over every returned
   example, for k in --ks (simulated from the full exact word totals and the first-order
   ranking; the --run-k mode is also run through explain() and checked against it).

--write-overlay DIR: a bundle directory DIR/<name> whose files are symlinks to the bundle's
plus the scope_inputs.safetensors (--overlay-dtype) this run computed, listed in its own
manifest (the bundle itself is not modified): what bench/explain_latency.py then loads.

Writes bench/results/scope_inputs.json and bench/results/eq8_topk.json; last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from _common import default_candidates, load_runtime, log, no_stop, sample_sentences
from _results import write_result
from safetensors.torch import save

from pairdots_server.core.scoring import Row, token_influence_many
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.explain import ExplainQuery, Influential, explain
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.scope_inputs import SCOPE_INPUTS_FILE, ScopeInputs
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.wordmatch import stem
from pairdots_server.storage.update import update_bundle


def loadavg() -> list[str]:
    with open("/proc/loadavg") as fh:
        return fh.read().split()[:3]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def top_ids(scores: torch.Tensor, ids: list[int], k: int = 10) -> tuple[list[int], list[int]]:
    order = torch.argsort(scores, descending=True).tolist()
    return [ids[i] for i in order[:k]], [ids[i] for i in order[::-1][:k]]


def make_overlay(bundle: Path, out_root: Path) -> Path:
    """out_root/<name>: symlinks to every entry of the bundle, a copy of its manifest."""
    dst = out_root / bundle.name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for entry in bundle.iterdir():
        if entry.name == "manifest.json":
            shutil.copy2(entry, dst / entry.name)
        elif entry.name != SCOPE_INPUTS_FILE:
            os.symlink(entry.resolve(), dst / entry.name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--sentences", type=int, default=4, help="part 1 s_test sentences")
    ap.add_argument("--eq8-sentences", type=int, default=12, help="part 2 Explain sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", type=int, nargs="*", default=[1, 2, 3, 4, 6])
    ap.add_argument("--run-k", type=int, default=3)
    ap.add_argument(
        "--old-eq8-sentences",
        type=int,
        default=3,
        help="sentences whose Eq. 8 also runs the full-model path (slow)",
    )
    ap.add_argument("--write-overlay", default=None)
    ap.add_argument("--eq8-only", action="store_true", help="skip part 1 (the cache)")
    ap.add_argument("--overlay-dtype", default="float16", choices=("float32", "float16"))
    args = ap.parse_args()

    rt, load_s = load_runtime(args.bundle, args.threads)
    assert rt.split is not None, "the bundle's scope has no split"
    k = default_candidates(rt.n_train)
    settings = InfluenceSettings().resolve(rt, default_candidates=k)
    log(
        f"bundle {rt.name}: N={rt.n_train}, P={rt.num_params}, split {rt.split.key}, "
        f"K={k}, threads {args.threads}, loaded in {load_s:.1f}s"
    )

    if args.eq8_only:
        part2 = eq8_part(rt, args, k)
        print(json.dumps({"eq8_topk": part2}, default=str), flush=True)
        return

    # -- 1. the cache ---------------------------------------------------------------------
    cache = rt.scope_inputs()
    assert cache is not None
    t0 = time.perf_counter()
    cache.compute_all(lengths=[len(ex.text) for ex in rt.bundle.train])
    t_all = time.perf_counter() - t0
    tensors, meta = cache.to_tensors()
    f16 = ScopeInputs(rt.split, rt.encode_train, rt.n_train, cache.key, "float16")
    f16.load(
        {"hidden": tensors["hidden"].half(), "offsets": tensors["offsets"]},
        {**meta, "dtype": "float16"},
    )
    log(
        f"h_L of all {rt.n_train}: {t_all:.1f}s, {cache.nbytes / 2**20:.0f} MiB float32, "
        f"{f16.nbytes / 2**20:.0f} MiB float16"
    )
    rows1 = []
    for text, _ in sample_sentences(args.sentences, args.seed):
        enc = steps.encode_text(rt, text)
        label = int(steps.predict(rt, enc).argmax())
        m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, label)
        s_test, _ = steps.measurement_s_test(rt, enc, m, settings, no_stop)
        ids = steps.candidates(rt, s_test, settings)
        order = sorted(ids, key=lambda i: (len(rt.bundle.train[i].text), i))
        t0 = time.perf_counter()
        full = torch.cat(
            [
                steps._influence(rt, s_test, rt.encode_train(order[b : b + 32]))
                for b in range(0, len(order), 32)
            ]
        ).double()
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        c32 = steps._influence_cached(rt, cache, s_test, order, 32).double()
        t_c32 = time.perf_counter() - t0
        t0 = time.perf_counter()
        c16 = steps._influence_cached(rt, f16, s_test, order, 32).double()
        t_c16 = time.perf_counter() - t0
        same32 = top_ids(c32, order) == top_ids(full, order)
        same16 = top_ids(c16, order) == top_ids(full, order)
        row = {
            "candidates": len(order),
            "full_model_s": t_full,
            "cached_fp32_s": t_c32,
            "cached_fp16_s": t_c16,
            "fp32_max_rel_diff": rel_diff(c32, full),
            "fp16_max_rel_diff": rel_diff(c16, full),
            "fp32_same_top10": same32,
            "fp16_same_top10": same16,
        }
        rows1.append(row)
        log(
            f"  {len(order)} candidates: full {t_full:.2f}s, cached fp32 {t_c32:.2f}s "
            f"(Δ {row['fp32_max_rel_diff']:.1e}, top10 same {same32}), fp16 {t_c16:.2f}s "
            f"(Δ {row['fp16_max_rel_diff']:.1e}, top10 same {same16})"
        )

    def mean(key: str, rows: list[dict[str, float]]) -> float:
        return sum(float(r[key]) for r in rows) / len(rows)

    part1 = {
        "bench": "scope_inputs",
        "bundle": rt.name,
        "n_train": rt.n_train,
        "scope_parameters": rt.num_params,
        "split": rt.split.key,
        "threads": args.threads,
        "loadavg": loadavg(),
        "all_rows_seconds": t_all,
        "bytes_float32": cache.nbytes,
        "bytes_float16": f16.nbytes,
        "queries": rows1,
        "mean": {
            key: mean(key, rows1)
            for key in ("candidates", "full_model_s", "cached_fp32_s", "cached_fp16_s")
        },
        "max_rel_diff": {
            "fp32": max(r["fp32_max_rel_diff"] for r in rows1),
            "fp16": max(r["fp16_max_rel_diff"] for r in rows1),
        },
        "same_top10_all": {
            "fp32": all(r["fp32_same_top10"] for r in rows1),
            "fp16": all(r["fp16_same_top10"] for r in rows1),
        },
    }
    write_result("scope_inputs", part1)
    if args.write_overlay:
        dst = make_overlay(Path(args.bundle), Path(args.write_overlay))
        src = f16 if args.overlay_dtype == "float16" else cache
        t, mt = src.to_tensors()
        content = save({kk: v.contiguous() for kk, v in t.items()}, metadata=mt)
        update_bundle(
            dst,
            {SCOPE_INPUTS_FILE: content},
            {
                "scope_inputs": {
                    "file": SCOPE_INPUTS_FILE,
                    "bytes": len(content),
                    "dtype": args.overlay_dtype,
                    "count": rt.n_train,
                    "split": rt.split.key,
                    "seconds": round(t_all, 2),
                }
            },
        )
        log(f"overlay bundle with {SCOPE_INPUTS_FILE} ({len(content) / 2**20:.0f} MiB): {dst}")

    # -- 2. Eq. 8 -------------------------------------------------------------------------
    part2 = eq8_part(rt, args, k)
    print(json.dumps({"scope_inputs": part1, "eq8_topk": part2}, default=str), flush=True)


def eq8_part(rt: ModelRuntime, args: argparse.Namespace, k: int) -> dict[str, object]:
    assert rt.split is not None
    agree = {kk: 0 for kk in args.ks}
    exact_words = {kk: 0 for kk in args.ks}
    total_words = 0
    items_n = 0
    run_agree = run_n = 0
    t_full = t_run = 0.0
    old_new: list[dict[str, float]] = []
    result: dict[str, object] = {}
    t_last_k = 0.0
    for si, (text, _) in enumerate(sample_sentences(args.eq8_sentences, args.seed + 1)):
        ans = explain(rt, ExplainQuery(text), no_stop, default_candidates=k)
        t_full += ans.timings.get("token_influence", 0.0)
        la = ans.explanations[0]
        groups: list[tuple[str | None, list[Influential]]] = []
        if la.prediction is not None:
            groups.append((None, la.prediction.supporting + la.prediction.opposing))
        for sw in la.salient_words:
            groups.append((sw.text, sw.supporting + sw.opposing))
        uniq = sorted({it.train_index for _, its in groups for it in its})
        encs = {i: steps.encode_train_example(rt, i) for i in uniq}
        # the s_test the answer used: the prediction margin's (cached)
        m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, la.label)
        settings = InfluenceSettings().resolve(rt, default_candidates=k)
        s_test, _ = steps.measurement_s_test(rt, steps.encode_text(rt, text), m, settings, no_stop)
        est = dict(
            zip(
                uniq,
                steps._first_order(rt, s_test, uniq, [encs[i] for i in uniq], 4096),
                strict=True,
            )
        )
        for keep, its in groups:
            for it in its:
                e = encs[it.train_index]
                totals = [v for _, v in it.words]
                sign = 1.0 if it.influence >= 0 else -1.0
                seen = [w for w in range(len(totals)) if e.pieces[w] > 0]
                if not seen:
                    continue
                items_n += 1
                total_words += len(seen)
                ranked = sorted(seen, key=lambda w, t=est[it.train_index].totals: (-sign * t[w], w))
                for kk in args.ks:
                    want = set(ranked[:kk]) | {w for w in range(len(totals)) if e.pieces[w] == 0}
                    if keep is not None:
                        want |= {w for w in seen if stem(e.words[w]) == stem(keep)}
                    pick = max(sorted(want), key=lambda w: (sign * totals[w], -w))
                    agree[kk] += int(pick == it.responsible_word)
                    exact_words[kk] += len(want)
        # the run-k mode through explain() (s_test cached, a fresh memo); --run-k 0 skips it
        if args.run_k > 0:
            q = ExplainQuery(text, influence=InfluenceSettings(eq8_top_words=args.run_k))
            ans_k = explain(rt, q, no_stop, default_candidates=k)
            t_last_k = ans_k.timings.get("token_influence", 0.0)
            t_run += t_last_k
            lk = ans_k.explanations[0]
            pairs = []
            if la.prediction is not None and lk.prediction is not None:
                pairs += list(
                    zip(
                        la.prediction.supporting + la.prediction.opposing,
                        lk.prediction.supporting + lk.prediction.opposing,
                        strict=True,
                    )
                )
            for a, b in zip(la.salient_words, lk.salient_words, strict=True):
                pairs += list(
                    zip(a.supporting + a.opposing, b.supporting + b.opposing, strict=True)
                )
            for a, b in pairs:
                assert a.train_index == b.train_index
                run_n += 1
                run_agree += int(a.responsible_word == b.responsible_word)
        if si < args.old_eq8_sentences:  # the path before: copies through the full model's jvp
            rows = [Row(encs[i].embeds[0], encs[i].mask[0], rt.bundle.train[i].label) for i in uniq]
            pos = [encs[i].word_positions for i in uniq]
            t0 = time.perf_counter()
            old = token_influence_many(
                rt.task.logits_fn,
                rt.params,
                s_test,
                rows,
                pos,
                rt.unk_embed,
                batch_size=4096,
                max_tokens=4096,
            )
            t_old = time.perf_counter() - t0
            t0 = time.perf_counter()
            new = token_influence_many(
                rt.split.top,
                rt.params,
                s_test,
                rows,
                pos,
                rt.unk_embed,
                batch_size=4096,
                max_tokens=4096,
                trunk=rt.split.trunk,
            )
            t_new = time.perf_counter() - t0
            diff = max(
                rel_diff(a, b) for a, b in zip(new, old, strict=True) if float(b.abs().max()) > 0
            )
            old_new.append(
                {
                    "examples": len(uniq),
                    "copies": sum(len(p) for p in pos),
                    "full_model_s": t_old,
                    "trunk_s": t_new,
                    "max_rel_diff": diff,
                }
            )
            log(
                f"  eq8 {len(uniq)} examples: full-model copies {t_old:.2f}s, trunk + top "
                f"{t_new:.2f}s (Δ {diff:.1e})"
            )
        log(
            f"[{si + 1}] {text[:50]!r}: Eq. 8 full {ans.timings.get('token_influence', 0):.2f}s"
            f", top-{args.run_k} {t_last_k:.2f}s; agreement so "
            f"far " + ", ".join(f"k={kk} {agree[kk] / max(1, items_n):.3f}" for kk in args.ks)
        )
        result = {
            "bench": "eq8_topk",
            "bundle": rt.name,
            "n_train": rt.n_train,
            "threads": args.threads,
            "sentences": si + 1,
            "loadavg": loadavg(),
            "returned_examples": items_n,
            "mean_words_per_example": total_words / max(1, items_n),
            "agreement_by_k": {str(kk): agree[kk] / max(1, items_n) for kk in args.ks},
            "exact_words_per_example_by_k": {
                str(kk): exact_words[kk] / max(1, items_n) for kk in args.ks
            },
            "run_k": args.run_k,
            "run_k_agreement": run_agree / max(1, run_n),
            "run_k_examples": run_n,
            "token_influence_s_mean": {
                "full_exact": t_full / (si + 1),
                f"top_{args.run_k}": t_run / (si + 1),
            },
            "full_model_vs_trunk": old_new,
        }
        write_result("eq8_topk", result)  # after every sentence: a stopped run keeps it

    return result


if __name__ == "__main__":
    main()
