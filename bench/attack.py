"""Attack benchmark (paper §4.2, Table 4 analogue) on SST-2 with a MiniLM bundle.

A fixed seeded sample of correctly classified SST-2 test sentences (--select low_margin: the
correctly classified ones with the smallest margin under the served model) is attacked with each mode
(DEMOTE_SALIENT ↓I(z, f_y), PROMOTE_WRONG ↑I(z, f_y'), COMBINED, PREDICTION_MARGIN ↓I(z, m_y))
and the RANDOM baseline at n ∈ --ns training examples per test sentence; f is the Explain
default measurement (m_y among the training examples that contain the top-c_w word) unless
--measurement says otherwise. The model is retrained on each perturbed training set (scope
only by default, --full for a full retrain from the base checkpoint). The edits for n are the
first n of the n_max search per sentence (objectives take turns), so one search per mode
serves every n; an n = 0 row retrains on the unperturbed set, separating the retraining effect
from the attack. `--seeds` repeats the retrains with other recipe seeds (each with its own
n = 0 row and its own RANDOM draw; the influence search, seeded by --seed, is shared).

Per row: accuracy on the sample, mean margin m_y, flip rate (correct under the same seed's
n = 0 retrain, wrong now), each with a 95 % paired bootstrap interval of the change against
that n = 0 retrain (over sentences); per influence mode also the first-order predicted margin
change Σ Δm_y (objectives.py), the predicted flips (flip budget ≤ n), the Spearman correlation
of predicted and measured margin changes and of the flip budget and the measured change, and
the calibration of the predicted flips (measured flip rate among predicted / not predicted)
and of Σ Δm_y (least-squares slope of measured on predicted, through 0). `summary`: per seed
and n, each mode's accuracy cut against n = 0 and its ratio to RANDOM's cut. Search cost:
seconds per edit per mode. JSON: bench/results/attack<tag>.json, rewritten after every row;
the searches are cached under --cache and --resume keeps the rows already measured.

    PYTHONPATH=server:client python bench/attack.py --bundle bundles/minilm-sst2 --sample 50 \
        --ns 0,1,2,6,10,20 --seeds 0,1

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
    spearman,
    write_edits,
)
from _results import RESULTS, write_result

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import WordMeasurement
from pairdots_server.model.train import evaluate
from pairdots_server.perturb.attack import AttackMode, AttackQuery, run_attack
from pairdots_server.perturb.objectives import Edit, TargetCache, flip_budget
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import Example, read_examples

MODES = {"demote": AttackMode.DEMOTE_SALIENT, "promote": AttackMode.PROMOTE_WRONG,
         "combined": AttackMode.COMBINED, "margin": AttackMode.PREDICTION_MARGIN,
         "random": AttackMode.RANDOM}


def predicted_rows(sample: list[Example], margins0: list[float], edits: list[Edit],
                   n: int) -> tuple[list[float], list[int]]:
    """Per sentence: Σ Δm_y of its first n edits and its flip budget (0 = never)."""
    dm, budgets = [], []
    for k in range(len(sample)):
        mine = [e.predicted_margin_change for e in edits if e.example_index == k][:n]
        dm.append(sum(mine))
        budgets.append(flip_budget(margins0[k], mine)[0])
    return dm, budgets


def row_stats(m_after: list[float], m_base: list[float], seed: int) -> dict[str, Any]:
    """Accuracy, mean margin and flip rate of one retrain, each with the paired 95 % bootstrap
    interval of its change against the same seed's n = 0 retrain (margins per sentence)."""
    acc = [float(m > 0) for m in m_after]
    acc0 = [float(m > 0) for m in m_base]
    delta = [x - y for x, y in zip(m_after, m_base, strict=True)]
    flips = [float(b > 0 and x <= 0) for x, b in zip(m_after, m_base, strict=True)]
    d_acc = [x - y for x, y in zip(acc, acc0, strict=True)]
    return {
        "accuracy": sum(acc) / len(acc),
        "accuracy_change_vs_n0": sum(d_acc) / len(d_acc),
        "accuracy_change_ci95": bootstrap_ci(d_acc, seed),
        "mean_margin": sum(m_after) / len(m_after),
        "margin_change_vs_n0": sum(delta) / len(delta),
        "margin_change_ci95": bootstrap_ci(delta, seed),
        "flip_rate": sum(flips) / len(flips),
        "flip_rate_ci95": bootstrap_ci(flips, seed),
    }


def prediction_stats(sample: list[Example], margins0: list[float], edits: list[Edit], n: int,
                     m_after: list[float], m_base: list[float]) -> dict[str, Any]:
    """What the search predicted for the first n edits per sentence against what the retrain
    measured: Σ Δm_y, predicted flips (0 < flip budget ≤ n), rank correlations, calibration."""
    dm, budgets = predicted_rows(sample, margins0, edits, n)
    delta = [x - y for x, y in zip(m_after, m_base, strict=True)]
    flips = [b > 0 and x <= 0 for x, b in zip(m_after, m_base, strict=True)]
    pred_flip = [0 < b <= n for b in budgets]
    hit = [f for f, p in zip(flips, pred_flip, strict=True) if p]
    miss = [f for f, p in zip(flips, pred_flip, strict=True) if not p]
    sxx = sum(x * x for x in dm)
    return {
        "predicted_margin_change": sum(dm) / len(dm),
        "predicted_flip_rate": sum(pred_flip) / len(pred_flip),
        "spearman_predicted_vs_measured_margin_change": spearman(dm, delta),
        "spearman_flip_budget_vs_measured_change": spearman(
            [float(b) if b > 0 else 1e9 for b in budgets], delta),
        "flip_agreement": sum(x == y for x, y in zip(pred_flip, flips, strict=True))
        / len(flips),
        "calibration": {
            "predicted_flips": len(hit),
            "measured_flip_rate_among_predicted": sum(hit) / len(hit) if hit else None,
            "measured_flip_rate_among_not_predicted": sum(miss) / len(miss) if miss else None,
            "slope_measured_on_predicted_margin_change":
                sum(x * y for x, y in zip(dm, delta, strict=True)) / sxx if sxx > 0 else None,
        },
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed and n > 0: each mode's accuracy cut (n = 0 accuracy minus its own) and the
    ratio to RANDOM's cut at the same seed and n (None when RANDOM cut nothing)."""
    out = []
    base = {r["seed"]: r["accuracy"] for r in rows if r["mode"] == "none"}
    rand = {(r["seed"], r["n"]): base[r["seed"]] - r["accuracy"] for r in rows
            if r["mode"] == "random" and r["seed"] in base}
    for r in rows:
        if r["mode"] in ("none", "random") or r["seed"] not in base:
            continue
        cut = base[r["seed"]] - r["accuracy"]
        rc = rand.get((r["seed"], r["n"]))
        out.append({"seed": r["seed"], "mode": r["mode"], "n": r["n"], "accuracy_cut": cut,
                    "accuracy_cut_ci95": [-r["accuracy_change_ci95"][1],
                                          -r["accuracy_change_ci95"][0]],
                    "random_cut": rc, "ratio_to_random": cut / rc if rc else None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--sample", type=int, default=50, help="correctly classified test sentences")
    p.add_argument("--ns", default="0,1,2,6,10,20", help="training examples perturbed per sentence")
    p.add_argument("--modes", default="demote,promote,combined,margin,random")
    p.add_argument("--measurement", choices=[m.value for m in WordMeasurement], default="margin")
    p.add_argument("--tag", default="", help="suffix of the JSON name (attack<tag>.json)")
    p.add_argument("--select", choices=["random", "low_margin"], default="random",
                   help="random: a seeded sample of the correctly classified test sentences; "
                   "low_margin: the correctly classified ones with the smallest margin m_y "
                   "under the served model (the predictions an attack can flip at small n)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ns = sorted({int(x) for x in a.ns.split(",")} | {0})
    plan = seeds_and_ns(a, ns)
    modes = [MODES[m] for m in a.modes.split(",")]
    t_start = time.perf_counter()
    rt = ModelRuntime(load_bundle(a.bundle))
    test = read_examples(SST2 / "test.tsv")
    random.Random(a.seed).shuffle(test)
    sample: list[Example] = []
    if a.select == "low_margin":
        from pairdots_server.perturb.objectives import margins

        m_all = margins(rt.task, test, rt.max_length)  # > 0: correctly classified
        ranked = sorted((m, k) for k, m in enumerate(m_all) if m > 0)
        sample = [test[k] for _, k in ranked[: a.sample]]
    else:
        for i in range(0, len(test), 64):
            batch = test[i : i + 64]
            preds = evaluate(rt.task, batch, max_length=rt.max_length).predictions
            sample += [x for x, y in zip(batch, preds, strict=True) if y == x.label]
            if len(sample) >= a.sample:
                break
    sample = sample[: a.sample]
    log(f"{len(sample)} correctly classified test sentences ({a.select}); model {rt.name}, "
        f"{rt.n_train} training examples, index={rt.has_index}")
    import dataclasses

    settings = dataclasses.replace(influence_settings(a),
                                   word_measurement=WordMeasurement(a.measurement))
    cache = TargetCache()
    edits: dict[str, list[Edit]] = {}
    search_s: dict[str, float] = {}
    margins0: list[float] = []
    searches = [(m, a.seed) for m in modes if m is not AttackMode.RANDOM]
    if AttackMode.RANDOM in modes:
        searches += [(AttackMode.RANDOM, s) for s, _ in plan]
    for mode, seed in searches:
        name = mode.value if mode is not AttackMode.RANDOM or seed == plan[0][0] \
            else f"random@{seed}"
        key = {"bundle": str(a.bundle), "sample": [e.text for e in sample], "mode": mode.value,
               "n": max(ns), "seed": seed, "measurement": a.measurement,
               "max_words": a.max_words, "candidates": a.candidates,
               "random_candidates": a.random_candidates, "solver": a.solver,
               "exhaustive": a.exhaustive}

        def search(mode: AttackMode = mode, seed: int = seed) -> dict[str, Any]:
            t0 = time.perf_counter()
            q = AttackQuery(tuple(sample), mode, max(ns), random_candidates=a.random_candidates,
                            influence=settings, seed=seed, max_words=a.max_words)
            out = run_attack(rt, q, lambda: None,
                             lambda s, d, t: log(f"  {mode.value}: {s} {d}/{t}") if d % 5 == 0
                             else None,
                             default_candidates=a.candidates, target_cache=cache)
            return {"edits": edits_to_json(out.edits), "seconds": time.perf_counter() - t0,
                    "margins": [r.margin for r in out.reports], "notes": len(out.notes)}

        got = cached_search(a.cache / f"attack{a.tag}-{name}.json", key, search)
        edits[name] = edits_from_json(got["edits"])
        search_s[name] = round(got["seconds"], 1)
        margins0 = got["margins"]
        log(f"{name}: {len(edits[name])} edits in {search_s[name]:.0f} s "
            f"({search_s[name] / max(1, len(edits[name])):.3f} s/edit); notes {got['notes']}")
    spec0 = retrain_spec(a, plan[0][0])
    if a.edits_out is not None:
        write_edits(a.edits_out, "attack", rt, spec0, ns, {"accuracy": sample}, edits,
                    search_s=search_s)
    rows: list[dict[str, Any]] = []
    out_name = f"attack{a.tag}"
    if a.resume and (RESULTS / f"{out_name}.json").is_file():
        rows = json.loads((RESULTS / f"{out_name}.json").read_text()).get("rows", [])
        log(f"resuming: {len(rows)} rows kept")

    def save(rows: list[dict[str, Any]]) -> Any:
        return write_result(out_name, {
            "benchmark": "attack", "bundle": str(a.bundle), "sample": len(sample),
            "select": a.select, "sample_margins_served": margins0,
            "retrain": spec0.mode.value, "epochs": a.epochs, "max_steps": a.max_steps,
            "solver": a.solver, "measurement": a.measurement, "max_words": a.max_words,
            "candidates": a.candidates, "random_candidates": a.random_candidates,
            "threads": a.threads, "seed": a.seed, "seeds": [s for s, _ in plan],
            "ns": {str(s): n for s, n in plan}, "search_s": search_s,
            "search_s_per_edit": {m: round(search_s[m] / max(1, len(e)), 4)
                                  for m, e in edits.items()},
            "edits_searched": {m: len(e) for m, e in edits.items()},
            "summary": summarise(rows), "rows": rows,
            "seconds": round(time.perf_counter() - t_start, 1),
        })

    save(rows)  # the search's cost (s/edit) before any retrain
    if a.search_only:
        return
    done = {(r["seed"], r["mode"], r["n"]) for r in rows}
    for seed, seed_ns in plan:
        spec = retrain_spec(a, seed)
        mine = {("random" if m == f"random@{seed}" else m): e for m, e in edits.items()
                if not m.startswith("random") or m == f"random@{seed}"
                or (m == "random" and seed == plan[0][0])}
        base = next((r for r in rows if r["seed"] == seed and r["mode"] == "none"), None)
        for mode, n, used, train in edit_sets("attack", rt.bundle.train, mine, seed_ns):
            if (seed, mode, n) in done:
                continue
            same = seed_free_row(a, rows, seed, plan[0][0], mode, n)
            if same is not None:
                rows.append(same)
                continue
            res = retrain_eval(rt, train, spec, {"accuracy": sample}, with_margins=True)
            m_after: list[float] = res.pop("accuracy_margins")
            res.pop("accuracy_correct")
            res.pop("accuracy")
            if base is None:
                assert mode == "none"
            m_base = m_after if base is None else base["margins"]
            row: dict[str, Any] = {"seed": seed, "mode": mode, "n": n, "edits": used, **res,
                                   **row_stats(m_after, m_base, seed), "margins": m_after}
            if mode != "none":
                src = f"random@{seed}" if mode == "random" and f"random@{seed}" in edits \
                    else mode
                row["search_s_per_edit"] = search_s[src] / max(1, len(edits[src]))
            if mode not in ("none", "random"):
                row.update(prediction_stats(sample, margins0, edits[mode], n, m_after, m_base))
            if base is None:
                base = row
            rows.append(row)
            save(rows)  # written as each row is measured (a stopped run keeps what it had)
            log(f"seed {seed} {mode} n={n}: acc {row['accuracy']:.3f} "
                f"Δm {row['margin_change_vs_n0']:+.3f} "
                f"pred {row.get('predicted_margin_change', float('nan')):+.3f}")
    print(f"{'seed':>4} {'mode':<18}{'n':>4}{'acc':>7}{'Δacc 95% CI':>20}{'Δm vs n=0':>11}"
          f"{'95% CI':>18}{'pred Δm':>9}{'ρ':>7}")
    for r in rows:
        ci, ca = r["margin_change_ci95"], r["accuracy_change_ci95"]
        print(f"{r['seed']:>4} {r['mode']:<18}{r['n']:>4}{r['accuracy']:>7.3f}"
              f"  [{ca[0]:+.2f}, {ca[1]:+.2f}]   {r['margin_change_vs_n0']:>+9.3f}"
              f"  [{ci[0]:+.3f}, {ci[1]:+.3f}]"
              f"{r.get('predicted_margin_change', float('nan')):>+9.3f}"
              f"{r.get('spearman_predicted_vs_measured_margin_change', float('nan')):>7.2f}")
    path = save(rows)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
