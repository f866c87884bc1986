"""Repair benchmark (paper §4.3, Figure 2 analogue) on SST-2 with a MiniLM bundle.

The served model's errors on the SST-2 dev set are repaired with n ∈ --ns new training
examples per error (influence-guided: ↑I(z,w_y), ↓I(z,w_y') with synonyms and antonyms), and
with the same number of random augmentations (random training examples, random
synonym/antonym swap); the model is retrained on each augmented set (scope only by default,
--full for a full retrain) and dev and test accuracy are reported. n = 0 retrains on the
unaugmented set. The additions for n are the first n of the n_max search per error.
`--seeds` repeats the retrains with other recipe seeds, each with its own n = 0 row and its
own RANDOM draw (the influence search, seeded by --seed, is shared); `--max-errors` repairs a
seeded random subset of the errors. Per row: dev and test accuracy with 95 % bootstrap
intervals, and the change against the same seed's n = 0 with a paired bootstrap interval;
`summary`: per mode and n the mean and range over seeds, and influence minus random on test.
JSON: bench/results/repair<tag>.json, rewritten after every row (searches cached under
--cache, --resume keeps the rows already measured).

    PYTHONPATH=server:client python bench/repair.py --bundle bundles/minilm-sst2 \
        --ns 0,2,4,8,16 --seeds 0,1,2

Prints progress on stderr and a table.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch
from _perturb_common import (
    SST2,
    bootstrap_ci,
    cached_search,
    common_args,
    edit_sets,
    edits_from_json,
    edits_to_json,
    influence_settings,
    log,
    retrain_eval,
    retrain_spec,
    seed_free_row,
    seeds_and_ns,
    write_edits,
)
from _results import RESULTS, write_result

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model.train import evaluate
from pairdots_server.perturb.objectives import Edit, TargetCache
from pairdots_server.perturb.repair import RepairMode, RepairQuery, find_errors, run_repair
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import read_examples


def row_stats(correct: dict[str, list[int]], base: dict[str, list[int]] | None,
              seed: int) -> dict[str, Any]:
    """Per eval set: accuracy, its 95 % bootstrap interval, and the change against the same
    seed's n = 0 retrain with a paired 95 % bootstrap interval (over examples)."""
    out: dict[str, Any] = {}
    for name, c in correct.items():
        out[f"{name}_ci95"] = bootstrap_ci([float(x) for x in c], seed)
        if base is not None:
            d = [float(x - y) for x, y in zip(c, base[name], strict=True)]
            out[f"{name}_change_vs_n0"] = sum(d) / len(d)
            out[f"{name}_change_ci95"] = bootstrap_ci(d, seed)
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode and n: mean and spread (min, max) over seeds of the dev and test change
    against the same seed's n = 0, and the influence-minus-random test gap per seed."""
    out = []
    keys = sorted({(r["mode"], r["n"]) for r in rows if r["mode"] != "none"})
    for mode, n in keys:
        mine = [r for r in rows if r["mode"] == mode and r["n"] == n]
        item: dict[str, Any] = {"mode": mode, "n": n, "seeds": [r["seed"] for r in mine]}
        for name in ("dev", "test"):
            v = [r[f"{name}_change_vs_n0"] for r in mine]
            item[f"{name}_change_mean"] = sum(v) / len(v)
            item[f"{name}_change_range"] = [min(v), max(v)]
        if mode == "influence":
            gaps = [r["test"] - q["test"] for r in mine for q in rows
                    if q["mode"] == "random" and q["n"] == n and q["seed"] == r["seed"]]
            item["test_minus_random"] = gaps
        out.append(item)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--ns", default="0,2,4,8,16", help="new examples per error")
    p.add_argument("--max-errors", type=int, default=None,
                   help="repair a seeded random subset of this many dev errors (default: all)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test")
    p.add_argument("--tag", default="", help="suffix of the JSON name (repair<tag>.json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ns = sorted({int(x) for x in a.ns.split(",")} | {0})
    plan = seeds_and_ns(a, ns)
    t_start = time.perf_counter()
    rt = ModelRuntime(load_bundle(a.bundle))
    dev = read_examples(SST2 / "dev.tsv")
    test = read_examples(SST2 / "test.tsv", limit=a.test_limit)
    evals = {"dev": dev, "test": test}
    before = {k: evaluate(rt.task, v, max_length=rt.max_length).accuracy
              for k, v in evals.items()}
    all_errors = [dev[k] for k, _ in find_errors(rt, tuple(dev))]
    errors = list(all_errors)
    if a.max_errors is not None and a.max_errors < len(errors):
        errors = random.Random(a.seed).sample(errors, a.max_errors)
    log(f"served model: {before}; repairing {len(errors)} of {len(all_errors)} dev errors")
    settings = influence_settings(a)
    n_max = max(ns)
    edits: dict[str, list[Edit]] = {}
    search_s: dict[str, float] = {}
    cache = TargetCache()
    searches = [(RepairMode.INFLUENCE, a.seed)] + [(RepairMode.RANDOM, s) for s, _ in plan]
    for mode, seed in searches:
        name = mode.value if mode is RepairMode.INFLUENCE or seed == plan[0][0] \
            else f"random@{seed}"
        key = {"bundle": str(a.bundle), "errors": [e.text for e in errors], "n": n_max,
               "mode": mode.value, "seed": seed, "candidates": a.candidates,
               "random_candidates": a.random_candidates, "max_words": a.max_words,
               "solver": a.solver, "exhaustive": a.exhaustive}

        def search(mode: RepairMode = mode, seed: int = seed) -> dict[str, Any]:
            t0 = time.perf_counter()
            q = RepairQuery(tuple(errors), n_max, mode=mode,
                            random_candidates=a.random_candidates, influence=settings,
                            seed=seed, max_words=a.max_words)
            out = run_repair(
                rt, q, lambda: None,
                lambda s, d, t: log(f"  {mode.value}: {s} {d}/{t}") if d % 5 == 0 else None,
                default_candidates=a.candidates, target_cache=cache,
            )
            return {"edits": edits_to_json(out.edits), "seconds": time.perf_counter() - t0,
                    "notes": len(out.notes)}

        got = cached_search(a.cache / f"repair{a.tag}-{name}.json", key, search)
        edits[name] = edits_from_json(got["edits"])
        search_s[name] = round(got["seconds"], 1)
        log(f"{name}: {len(edits[name])} additions in {search_s[name]} s "
            f"({search_s[name] / max(1, len(errors)):.2f} s/error)")
    spec0 = retrain_spec(a, plan[0][0])
    if a.edits_out is not None:
        write_edits(a.edits_out, "repair", rt, spec0, ns, evals, edits, served=before,
                    errors=len(errors), search_s=search_s)
    out_name = f"repair{a.tag}"
    rows: list[dict[str, Any]] = []
    if a.resume and (RESULTS / f"{out_name}.json").is_file():
        rows = json.loads((RESULTS / f"{out_name}.json").read_text()).get("rows", [])
        log(f"resuming: {len(rows)} rows kept")
    correct: dict[tuple[int, str, int], dict[str, list[int]]] = {
        (r["seed"], r["mode"], r["n"]): r.pop("_correct") for r in rows if "_correct" in r
    }

    def save(rows: list[dict[str, Any]]) -> Any:
        keep = [{**r, "_correct": correct[(r["seed"], r["mode"], r["n"])]} for r in rows]
        return write_result(out_name, {
            "benchmark": "repair", "bundle": str(a.bundle), "errors": len(errors),
            "dev_errors": len(all_errors), "served": before, "retrain": spec0.mode.value,
            "epochs": a.epochs, "max_steps": a.max_steps, "solver": a.solver,
            "seeds": [s for s, _ in plan], "ns": {str(s): n for s, n in plan},
            "search_s": search_s,
            "search_s_per_error": {m: round(t / max(1, len(errors)), 3)
                                   for m, t in search_s.items()},
            "search_s_per_edit": {m: round(search_s[m] / max(1, len(e)), 4)
                                  for m, e in edits.items()},
            "summary": summarise(rows), "rows": keep,
            "seconds": round(time.perf_counter() - t_start, 1),
        })

    save(rows)
    if a.search_only:
        return
    for seed, seed_ns in plan:
        spec = retrain_spec(a, seed)
        mine = {"influence": edits["influence"],
                "random": edits["random" if seed == plan[0][0] else f"random@{seed}"]}
        for mode, n, added, train in edit_sets("repair", rt.bundle.train, mine, seed_ns):
            if (seed, mode, n) in correct:
                continue
            same = seed_free_row(a, rows, seed, plan[0][0], mode, n)
            if same is not None:
                correct[(seed, mode, n)] = correct[(plan[0][0], mode, n)]
                rows.append(same)
                continue
            res = retrain_eval(rt, train, spec, evals)
            c = {k: res.pop(f"{k}_correct") for k in evals}
            base = correct.get((seed, "none", 0))
            row = {"seed": seed, "mode": mode, "n": n, "added": added, **res,
                   **row_stats(c, base, seed)}
            correct[(seed, mode, n)] = c
            rows.append(row)
            save(rows)
            log(f"seed {seed} {mode} n={n}: dev {row['dev']:.4f} test {row['test']:.4f}")
    print(f"{'seed':>4} {'mode':<12}{'n':>4}{'added':>7}{'dev':>8}{'test':>8}"
          f"{'Δtest vs n=0 [95% CI]':>30}")
    print(f"{'':>4} {'served':<12}{'-':>4}{0:>7}{before['dev']:>8.4f}{before['test']:>8.4f}")
    for r in rows:
        ci = r.get("test_change_ci95", (float("nan"), float("nan")))
        print(f"{r['seed']:>4} {r['mode']!s:<12}{r['n']!s:>4}{r['added']!s:>7}{r['dev']:>8.4f}"
              f"{r['test']:>8.4f}   {r.get('test_change_vs_n0', 0.0):+.4f} "
              f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")
    log(f"wrote {save(rows)}")


if __name__ == "__main__":
    main()
