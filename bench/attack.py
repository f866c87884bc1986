"""Attack benchmark (paper §4.2, Table 4 analogue) on SST-2 with a MiniLM bundle.

A fixed seeded sample of correctly classified SST-2 test sentences is attacked with each mode
(DEMOTE_SALIENT ↓I(z,w_y), PROMOTE_WRONG ↑I(z,w_y'), COMBINED) and the RANDOM baseline at
n ∈ --ns training examples per test sentence; the model is retrained on each perturbed
training set (scope only by default, --full for a full retrain from the base checkpoint) and
the accuracy on the sampled sentences is reported. The edits for n are the first n of the
n_max search per sentence (greedy order), so one search per mode serves every n. An n = 0 row
retrains on the unperturbed set, separating the retraining effect from the attack. Besides
accuracy it reports the mean -log p(y|x) on the sample (it moves when accuracy cannot) and the
first-order predicted relative change of the targeted salient score, Σ ΔI / (N·s(w)) (Eq. 7),
which is what the attack optimises; bench/retrain_edits.py measures that change after a full
retrain (--edits-out writes the edits it replays).

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
    edit_sets,
    influence_settings,
    log,
    retrain_eval,
    retrain_spec,
    write_edits,
)

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model.train import evaluate
from pairdots_server.perturb.attack import (
    DEMOTE,
    PROMOTE,
    AttackMode,
    AttackQuery,
    run_attack,
)
from pairdots_server.perturb.objectives import Edit, TargetCache
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example, read_examples

MODES = {"demote": AttackMode.DEMOTE_SALIENT, "promote": AttackMode.PROMOTE_WRONG,
         "combined": AttackMode.COMBINED, "random": AttackMode.RANDOM}


def predicted_change(
    sample: list[Example], cache: TargetCache, edits: dict[str, list[Edit]], ns: list[int],
    n_train: int,
) -> dict[str, dict[int, dict[str, float]]]:
    """Per mode, n and targeted word (w_y for DEMOTE edits, w_y' for PROMOTE edits), the mean
    over the sample of the first-order predicted relative change of that salient score:
    Δs/s ≈ Σ_edits (I(z̃, w) - I(z, w)) / (N · s(w)) (Eq. 5/7: replacing z by z̃ upweights z̃
    and downweights z by 1/N). Random edits carry no influence and predict nothing."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for mode, es in edits.items():
        out[mode] = {}
        for n in ns:
            per_word: dict[str, float] = {}
            for objective, word in ((DEMOTE, "w_y"), (PROMOTE, "w_y'")):
                rel = []
                for k, ex in enumerate(sample):
                    keys = [key for key in cache if key[0] == ex.text
                            and (key[1] == ex.label) == (objective == DEMOTE)]
                    tgt = cache.get(keys[0]) if keys else None
                    mine = [e for e in es if e.example_index == k][:n]
                    part = [e.influence_change for e in mine if e.objective == objective]
                    if tgt is not None and tgt.saliency != 0 and part:
                        rel.append(sum(part) / (n_train * abs(tgt.saliency)))
                if rel:
                    per_word[word] = float(f"{sum(rel) / len(rel):.3g}")
            out[mode][n] = per_word
    return out


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
    edits: dict[str, list] = {}
    search_s: dict[str, float] = {}
    for mode in modes:
        t0 = time.perf_counter()
        q = AttackQuery(tuple(sample), mode, max(ns), random_candidates=a.random_candidates,
                        influence=settings, seed=a.seed)
        out = run_attack(rt, q, lambda: None,
                         lambda s, d, t, m=mode: log(f"  {m.value}: {s} {d}/{t}") if d % 5 == 0
                         else None,
                         default_candidates=a.candidates, target_cache=cache)
        search_s[mode.value] = round(time.perf_counter() - t0, 1)
        edits[mode.value] = out.edits
        log(f"{mode.value}: {len(out.edits)} edits in {search_s[mode.value]:.0f} s; "
            f"notes {len(out.notes)}")
    predicted = predicted_change(sample, cache, edits, ns, rt.n_train)
    log(f"first-order predicted relative change of the targeted s(w): {predicted}")
    if a.edits_out is not None:
        write_edits(a.edits_out, "attack", rt, spec, ns, {"accuracy": sample}, edits,
                    search_s=search_s, predicted_relative_change=predicted)
    rows: list[dict[str, object]] = []
    if a.search_only:
        return
    for mode, n, used, train in edit_sets("attack", rt.bundle.train, edits, ns):
        res = retrain_eval(rt, train, spec, {"accuracy": sample})
        rows.append({"mode": mode, "n": n, "edits": used, "search_s": search_s.get(mode, 0.0),
                     **res})
        log(f"{mode} n={n}: {res}")
    print(f"{'mode':<16}{'n':>4}{'edits':>7}{'acc':>8}")
    for r in rows:
        print(f"{r['mode']!s:<16}{r['n']!s:>4}{r.get('edits', 0)!s:>7}{r['accuracy']:>8.3f}")
    print(json.dumps({
        "benchmark": "attack", "bundle": str(a.bundle), "sample": len(sample),
        "retrain": spec.mode.value, "epochs": a.epochs, "max_steps": a.max_steps,
        "solver": a.solver, "accuracy_before": 1.0, "rows": rows,
        "predicted_relative_change": predicted, "search_s": search_s,
        "seconds": round(time.perf_counter() - t_start, 1),
    }))


if __name__ == "__main__":
    main()
