"""Repair benchmark (paper §4.3, Figure 2 analogue) on SST-2 with a MiniLM bundle.

The served model's errors on the SST-2 dev set are repaired with n ∈ --ns new training
examples per error (influence-guided: ↑I(z,w_y), ↓I(z,w_y') with synonyms and antonyms), and
with the same number of random augmentations (random training examples, random
synonym/antonym swap); the model is retrained on each augmented set (scope only by default,
--full for a full retrain) and dev and test accuracy are reported. n = 0 retrains on the
unaugmented set. The additions for n are the first n of the n_max search per error.

    PYTHONPATH=server:client python bench/repair.py --bundle bundles/minilm-sst2

Prints progress on stderr, a table, and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _perturb_common import (
    SST2,
    common_args,
    edit_sets,
    influence_settings,
    log,
    retrain_eval,
    retrain_spec,
    write_edits,
)

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model.train import evaluate
from pairdots_server.perturb.repair import RepairMode, RepairQuery, find_errors, run_repair
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import read_examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--ns", default="0,2,4,8", help="new examples per error")
    p.add_argument("--max-errors", type=int, default=None, help="repair at most this many")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ns = sorted({int(x) for x in a.ns.split(",")})
    t_start = time.perf_counter()
    rt = ModelRuntime(load_bundle(a.bundle))
    dev = read_examples(SST2 / "dev.tsv")
    test = read_examples(SST2 / "test.tsv", limit=a.test_limit)
    evals = {"dev": dev, "test": test}
    before = {k: evaluate(rt.task, v, max_length=rt.max_length).accuracy
              for k, v in evals.items()}
    errors = [dev[k] for k, _ in find_errors(rt, tuple(dev))][: a.max_errors]
    log(f"served model: {before}; repairing {len(errors)} dev errors")
    settings = influence_settings(a)
    spec = retrain_spec(a)
    n_max = max(ns)
    outcomes = {}
    search_s = {}
    for mode in (RepairMode.INFLUENCE, RepairMode.RANDOM):
        if n_max == 0:
            break
        t0 = time.perf_counter()
        q = RepairQuery(tuple(errors), n_max, mode=mode, random_candidates=a.random_candidates,
                        influence=settings, seed=a.seed)
        outcomes[mode] = run_repair(
            rt, q, lambda: None,
            lambda s, d, t, m=mode: log(f"  {m.value}: {s} {d}/{t}") if d % 5 == 0 else None,
            default_candidates=a.candidates,
        )
        search_s[mode] = round(time.perf_counter() - t0, 1)
        log(f"{mode.value}: {len(outcomes[mode].edits)} additions in {search_s[mode]} s")
    edits = {m.value: o.edits for m, o in outcomes.items()}
    if a.edits_out is not None:
        write_edits(a.edits_out, "repair", rt, spec, ns, evals, edits, served=before,
                    errors=len(errors), search_s={m.value: t for m, t in search_s.items()})
    if a.search_only:
        return
    rows: list[dict[str, object]] = []
    for mode, n, added, train in edit_sets("repair", rt.bundle.train, edits, ns):
        res = retrain_eval(rt, train, spec, evals)
        row = {"mode": mode, "n": n, "added": added,
               "search_s": search_s.get(RepairMode(mode), 0.0) if n else 0.0, **res}
        rows.append(row)
        log(str(row))
    print(f"{'mode':<12}{'n':>4}{'added':>7}{'dev':>8}{'test':>8}")
    print(f"{'served':<12}{'-':>4}{0:>7}{before['dev']:>8.4f}{before['test']:>8.4f}")
    for r in rows:
        print(f"{r['mode']!s:<12}{r['n']!s:>4}{r['added']!s:>7}{r['dev']:>8.4f}{r['test']:>8.4f}")
    print(json.dumps({
        "benchmark": "repair", "bundle": str(a.bundle), "errors": len(errors),
        "served": before, "retrain": spec.mode.value, "epochs": a.epochs,
        "max_steps": a.max_steps, "solver": a.solver, "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
    }))


if __name__ == "__main__":
    main()
