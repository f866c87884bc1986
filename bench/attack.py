"""Attack benchmark (paper §4.2, Table 4 analogue) on SST-2 with a MiniLM bundle.

A fixed seeded sample of correctly classified SST-2 test sentences is attacked with each mode
(DEMOTE_SALIENT ↓I(z, f_y), PROMOTE_WRONG ↑I(z, f_y'), COMBINED, PREDICTION_MARGIN ↓I(z, m_y))
and the RANDOM baseline at n ∈ --ns training examples per test sentence; f is the Explain
default measurement (m_y among the training examples that contain the top-c_w word) unless
--measurement says otherwise. The model is retrained on each perturbed training set (scope
only by default, --full for a full retrain from the base checkpoint). The edits for n are the
first n of the n_max search per sentence (objectives take turns), so one search per mode
serves every n; an n = 0 row retrains on the unperturbed set, separating the retraining effect
from the attack.

Per row: accuracy on the sample, mean margin m_y, flip rate, and the change of each sentence's
margin against the n = 0 retrain (mean, with a 95 % bootstrap interval over sentences); per
influence mode also the first-order predicted margin change Σ Δm_y (objectives.py), the
predicted flips (flip budget ≤ n) and, against the measured flips and margin changes, the
Spearman rank correlation. Search cost: seconds per edit. JSON: bench/results/attack.json
(--tag appends to the name).

    PYTHONPATH=server:client python bench/attack.py --bundle bundles/minilm-sst2 --sample 50

Prints progress on stderr and a table.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

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
from _results import write_result

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import WordMeasurement
from pairdots_server.model.train import evaluate
from pairdots_server.perturb.attack import AttackMode, AttackQuery, run_attack
from pairdots_server.perturb.objectives import Edit, flip_budget
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example, read_examples

MODES = {"demote": AttackMode.DEMOTE_SALIENT, "promote": AttackMode.PROMOTE_WRONG,
         "combined": AttackMode.COMBINED, "margin": AttackMode.PREDICTION_MARGIN,
         "random": AttackMode.RANDOM}


def bootstrap_ci(values: list[float], seed: int = 0, reps: int = 2000) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean over `values` (resampled with
    replacement)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return (means[int(0.025 * reps)], means[int(0.975 * reps) - 1])


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 pairs."""
    if len(a) < 3:
        return float("nan")

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def predicted_rows(sample: list[Example], margins0: list[float], edits: list[Edit],
                   n: int) -> tuple[list[float], list[int]]:
    """Per sentence: Σ Δm_y of its first n edits and its flip budget (0 = never)."""
    dm, budgets = [], []
    for k in range(len(sample)):
        mine = [e.predicted_margin_change for e in edits if e.example_index == k][:n]
        dm.append(sum(mine))
        budgets.append(flip_budget(margins0[k], mine)[0])
    return dm, budgets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--sample", type=int, default=50, help="correctly classified test sentences")
    p.add_argument("--ns", default="0,1,2,6,10", help="training examples perturbed per sentence")
    p.add_argument("--modes", default="demote,promote,combined,margin,random")
    p.add_argument("--measurement", choices=[m.value for m in WordMeasurement], default="margin")
    p.add_argument("--tag", default="", help="suffix of the JSON name (attack<tag>.json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ns = sorted({int(x) for x in a.ns.split(",")} | {0})
    modes = [MODES[m] for m in a.modes.split(",")]
    t_start = time.perf_counter()
    rt = ModelRuntime(load_bundle(a.bundle))
    test = read_examples(SST2 / "test.tsv")
    random.Random(a.seed).shuffle(test)
    sample: list[Example] = []
    for i in range(0, len(test), 64):
        batch = test[i : i + 64]
        preds = evaluate(rt.task, batch, max_length=rt.max_length).predictions
        sample += [x for x, y in zip(batch, preds, strict=True) if y == x.label]
        if len(sample) >= a.sample:
            break
    sample = sample[: a.sample]
    log(f"{len(sample)} correctly classified test sentences; model {rt.name}, "
        f"{rt.n_train} training examples, index={rt.has_index}")
    import dataclasses

    settings = dataclasses.replace(influence_settings(a),
                                   word_measurement=WordMeasurement(a.measurement))
    spec = retrain_spec(a)
    cache: dict = {}
    edits: dict[str, list[Edit]] = {}
    search_s: dict[str, float] = {}
    margins0: list[float] = []
    for mode in modes:
        t0 = time.perf_counter()
        q = AttackQuery(tuple(sample), mode, max(ns), random_candidates=a.random_candidates,
                        influence=settings, seed=a.seed, max_words=a.max_words)
        out = run_attack(rt, q, lambda: None,
                         lambda s, d, t, m=mode: log(f"  {m.value}: {s} {d}/{t}") if d % 5 == 0
                         else None,
                         default_candidates=a.candidates, target_cache=cache)
        search_s[mode.value] = round(time.perf_counter() - t0, 1)
        edits[mode.value] = out.edits
        margins0 = [r.margin for r in out.reports]
        log(f"{mode.value}: {len(out.edits)} edits in {search_s[mode.value]:.0f} s "
            f"({search_s[mode.value] / max(1, len(out.edits)):.2f} s/edit); notes {len(out.notes)}")
    if a.edits_out is not None:
        write_edits(a.edits_out, "attack", rt, spec, ns, {"accuracy": sample}, edits,
                    search_s=search_s)
    if a.search_only:
        return
    rows: list[dict[str, Any]] = []
    base_margins: list[float] = []

    def save(rows: list[dict[str, Any]]) -> Any:
        return write_result(f"attack{a.tag}", {
            "benchmark": "attack", "bundle": str(a.bundle), "sample": len(sample),
            "retrain": spec.mode.value, "epochs": a.epochs, "max_steps": a.max_steps,
            "solver": a.solver, "measurement": a.measurement, "max_words": a.max_words,
            "candidates": a.candidates, "random_candidates": a.random_candidates,
            "threads": a.threads, "seed": a.seed, "rows": rows, "search_s": search_s,
            "seconds": round(time.perf_counter() - t_start, 1),
        })

    save(rows)  # the search's cost (s/edit) before any retrain
    for mode, n, used, train in edit_sets("attack", rt.bundle.train, edits, ns):
        res = retrain_eval(rt, train, spec, {"accuracy": sample}, with_margins=True)
        m_after: list[float] = res.pop("accuracy_margins")
        if mode == "none":
            base_margins = m_after
        delta = [x - y for x, y in zip(m_after, base_margins, strict=True)]
        flips = [b > 0 and x <= 0 for x, b in zip(m_after, base_margins, strict=True)]
        row: dict[str, Any] = {
            "mode": mode, "n": n, "edits": used, **res,
            "mean_margin": sum(m_after) / len(m_after),
            "flip_rate": sum(m <= 0 for m in m_after) / len(m_after),
            "margin_change_vs_n0": sum(delta) / len(delta),
            "margin_change_ci95": bootstrap_ci(delta, a.seed),
            "accuracy_change_ci95": bootstrap_ci(
                [float(x > 0) - float(b > 0) for x, b in zip(m_after, base_margins, strict=True)],
                a.seed),
        }
        if mode in search_s:
            row["search_s_per_edit"] = search_s[mode] / max(1, len(edits[mode]))
        if mode not in ("none", "random"):
            dm, budgets = predicted_rows(sample, margins0, edits[mode], n)
            pred_flip = [0 < b <= n for b in budgets]
            row.update({
                "predicted_margin_change": sum(dm) / len(dm),
                "predicted_flip_rate": sum(pred_flip) / len(pred_flip),
                "spearman_predicted_vs_measured_margin_change": spearman(dm, delta),
                "spearman_flip_budget_vs_measured_change": spearman(
                    [float(b) if b > 0 else 1e9 for b in budgets], delta),
                "flip_agreement": sum(x == y for x, y in zip(pred_flip, flips, strict=True))
                / len(flips),
            })
        rows.append(row)
        save(rows)  # written as each row is measured (a stopped run keeps what it had)
        log(f"{mode} n={n}: acc {row['accuracy']:.3f} Δm {row['margin_change_vs_n0']:+.3f} "
            f"{row.get('predicted_margin_change', '')}")
    print(f"{'mode':<18}{'n':>4}{'acc':>7}{'Δm vs n=0':>11}{'95% CI':>18}{'pred Δm':>9}"
          f"{'ρ':>7}")
    for r in rows:
        ci = r["margin_change_ci95"]
        print(f"{r['mode']:<18}{r['n']:>4}{r['accuracy']:>7.3f}{r['margin_change_vs_n0']:>+11.3f}"
              f"  [{ci[0]:+.3f}, {ci[1]:+.3f}]"
              f"{r.get('predicted_margin_change', float('nan')):>+9.3f}"
              f"{r.get('spearman_predicted_vs_measured_margin_change', float('nan')):>7.2f}")
    path = save(rows)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
