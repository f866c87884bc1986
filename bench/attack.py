"""Attack benchmark (paper §4.2, Table 4 analogue) on SST-2 with a MiniLM bundle.

A fixed seeded sample of correctly classified SST-2 test sentences is attacked with each mode
(DEMOTE_SALIENT ↓I(z,w_y), PROMOTE_WRONG ↑I(z,w_y'), COMBINED) and the RANDOM baseline at
n ∈ --ns training examples per test sentence; the model is retrained on each perturbed
training set (scope only by default, --full for a full retrain from the base checkpoint) and
the accuracy on the sampled sentences is reported. The edits for n are the first n of the
n_max search per sentence (greedy order), so one search per mode serves every n. An n = 0 row
retrains on the unperturbed set, separating the retraining effect from the attack.

    PYTHONPATH=server:client python bench/attack.py --bundle bundles/minilm-sst2 --sample 50

Prints progress on stderr, a table, and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from _perturb_common import (
    SST2,
    common_args,
    first_n_per_example,
    influence_settings,
    log,
    retrain_eval,
    retrain_spec,
)

from pairdots_server.bundle import load_bundle
from pairdots_server.data import read_examples
from pairdots_server.perturb.attack import AttackMode, AttackQuery, apply_replacements, run_attack
from pairdots_server.runtime import ModelRuntime
from pairdots_server.train import evaluate

MODES = {"demote": AttackMode.DEMOTE_SALIENT, "promote": AttackMode.PROMOTE_WRONG,
         "combined": AttackMode.COMBINED, "random": AttackMode.RANDOM}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--sample", type=int, default=50, help="correctly classified test sentences")
    p.add_argument("--ns", default="1,2,6,10", help="training examples perturbed per sentence")
    p.add_argument("--modes", default="demote,promote,combined,random")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ns = sorted({int(x) for x in a.ns.split(",")})
    modes = [MODES[m] for m in a.modes.split(",")]
    t_start = time.perf_counter()
    rt = ModelRuntime(load_bundle(a.bundle))
    test = read_examples(SST2 / "test.tsv")
    random.Random(a.seed).shuffle(test)
    sample = []
    for i in range(0, len(test), 64):
        batch = test[i : i + 64]
        preds = evaluate(rt.task, batch, max_length=rt.max_length).predictions
        sample += [x for x, y in zip(batch, preds, strict=True) if y == x.label]
        if len(sample) >= a.sample:
            break
    sample = sample[: a.sample]
    log(f"{len(sample)} correctly classified test sentences; model {rt.name}, "
        f"{rt.n_train} training examples, index={rt.has_index}, low_rank={rt.has_lowrank}")
    settings = influence_settings(a)
    spec = retrain_spec(a)
    cache: dict = {}
    rows: list[dict[str, object]] = []
    base = retrain_eval(rt, rt.bundle.train, spec, {"accuracy": sample})
    rows.append({"mode": "none", "n": 0, **base})
    log(f"n=0 (retrain on the unperturbed set): {base}")
    for mode in modes:
        t0 = time.perf_counter()
        q = AttackQuery(tuple(sample), mode, max(ns), random_candidates=a.random_candidates,
                        influence=settings, seed=a.seed)
        out = run_attack(rt, q, lambda: None,
                         lambda s, d, t, m=mode: log(f"  {m.value}: {s} {d}/{t}") if d % 5 == 0
                         else None,
                         default_candidates=a.candidates, target_cache=cache)
        search_s = time.perf_counter() - t0
        log(f"{mode.value}: {len(out.edits)} edits in {search_s:.0f} s; notes {len(out.notes)}")
        for n in ns:
            edits = first_n_per_example(out.edits, n)
            train = apply_replacements(rt.bundle.train, edits)
            res = retrain_eval(rt, train, spec, {"accuracy": sample})
            rows.append({"mode": mode.value, "n": n, "edits": len(edits),
                         "search_s": round(search_s, 1), **res})
            log(f"{mode.value} n={n}: {res}")
    print(f"{'mode':<16}{'n':>4}{'edits':>7}{'acc':>8}")
    for r in rows:
        print(f"{r['mode']!s:<16}{r['n']!s:>4}{r.get('edits', 0)!s:>7}{r['accuracy']:>8.3f}")
    print(json.dumps({
        "benchmark": "attack", "bundle": str(a.bundle), "sample": len(sample),
        "retrain": spec.mode.value, "epochs": a.epochs, "max_steps": a.max_steps,
        "solver": a.solver, "accuracy_before": 1.0, "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
    }))


if __name__ == "__main__":
    main()
