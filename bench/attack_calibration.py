"""How well does the first-order prediction of an attack's effect match the retrain? (issue 12,
"the flip budget predicts the measured flips").

Reads an attack table (bench/attack.py's JSON: per row the retrained margins of every attacked
sentence) and the edits it applied (the search cache), and predicts, for every row and
sentence k, the margin change the row's edits cause under several solvers:

    own:  Σ_{e of sentence k} (I_k(z̃_e) − I_k(z_e)) / N      (what bench/attack.py reports)
    all:  Σ_{e of every sentence} (I_k(z̃_e) − I_k(z_e)) / N   (every edit of the row is in the
          retrained set, so every edit moves every sentence's margin)

with I_k(z) = −⟨s_k, ∇θL(z)⟩ and s_k = (H + δI)⁻¹ ∇θ m_y(x_k) by each solver (Eq. 5, the
prediction-level measurement). The RANDOM rows get predictions too (their edits were not
chosen by influence). Against the measured change (margin after the row's retrain minus the
same seed's n = 0 retrain), per solver: Spearman over all (row, sentence) pairs, per row, and
the least-squares slope through zero of measured on predicted (the factor a calibrated flip
budget would need); and whether the predicted change flips what the retrain flips, and
the flip budget against the measured one (flip_analysis). Gradients: every original and
edited training text once (pipeline.score_texts_many: per-example gradients of the scoped top
from h_L), contracted with all s_k at once — what the service's request_effects does.

    PYTHONPATH=server:client python3 bench/attack_calibration.py \
        --result bench/results/attack_s10_stepseed.json --tag _s10_stepseed

Last line: one JSON object; also bench/results/attack_calibration<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from _perturb_common import SST2, edits_from_json, first_n_per_example, log, spearman
from _results import write_result

from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.pipeline import score_texts_many
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_config import SolverChoice, SolverSettings
from pairdots_server.influence.solver_policy import solve_s_test
from pairdots_server.perturb.objectives import Edit
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import read_examples


def slope(pred: list[float], meas: list[float]) -> float | None:
    sxx = sum(x * x for x in pred)
    return sum(x * y for x, y in zip(pred, meas, strict=True)) / sxx if sxx > 0 else None


def budget_of(m0: float, path: list[float]) -> float:
    """Edits per sentence after which m0 + path[n-1] first has the other sign than m0 (path[n-1]:
    the predicted change with the first n edits of every sentence); beyond len(path) it
    extrapolates at the mean rate towards zero, inf when the prediction moves away."""
    for n, dm in enumerate(path, start=1):
        if (m0 + dm) * m0 < 0:
            return float(n)
    rate = -math.copysign(1.0, m0) * path[-1] / len(path) if path else 0.0
    return float(max(len(path) + 1, math.ceil(abs(m0) / rate))) if rate > 0 else math.inf


def flip_analysis(
    rows: list[dict[str, Any]], base: dict[int, list[float]], edits: dict[str, list[Edit]],
    delta: dict[str, torch.Tensor], cols: list[int], n_train: int, source: Any,
    served: list[float],
) -> dict[str, Any]:
    """Does the predicted change flip what the retrain flips? Per influence-guided row and
    sentence k, from the n = 0 retrain's margin b_k of the same seed:

        predicted flip  (b_k + Δ̂_k) has the other sign than b_k   (Δ̂: all edits, first order)
        measured flip   the row's retrained margin has the other sign than b_k

    (precision, recall, agreement; and from the served margin with the served sign, as the API
    reports predicted_flip). Flip budget: per (seed, mode) and sentence, the edits per sentence
    (n = 1..n_max, every sentence's first n edits applied) after which b_k + Δ̂_k(n) first
    changes sign (budget_of), against the measured one — the smallest row n that flipped it,
    n_max + 1 when none did: Spearman, and the share flipped among predicted budget ≤ n."""
    out: dict[str, Any] = {"rows": []}
    tp = fp = fn = tn = 0
    stp = sfp = sfn = stn = 0
    for r in rows:
        if r["mode"] in ("random",):
            continue
        es = edits[source(r)]
        used = first_n_per_example(es, r["n"])
        pos = {id(e): i for i, e in enumerate(es)}
        idx = torch.tensor([pos[id(e)] for e in used], dtype=torch.long)
        pred = (delta[source(r)][idx][:, cols].sum(0) / n_train).tolist()
        b = base[r["seed"]]
        got = {"seed": r["seed"], "mode": r["mode"], "n": r["n"], "tp": 0, "fp": 0, "fn": 0,
               "tn": 0}
        for k, (bk, dk, mk) in enumerate(zip(b, pred, r["margins"], strict=True)):
            p, m = (bk + dk) * bk < 0, mk * bk < 0
            key = ("tp" if m else "fp") if p else ("fn" if m else "tn")
            got[key] += 1
            sp, sm = (served[k] + dk) * served[k] < 0, mk * served[k] < 0
            stp += sp and sm
            sfp += sp and not sm
            sfn += sm and not sp
            stn += not sp and not sm
        tp, fp, fn, tn = tp + got["tp"], fp + got["fp"], fn + got["fn"], tn + got["tn"]
        out["rows"].append(got)

    def rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, Any]:
        return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
                "precision": tp / (tp + fp) if tp + fp else None,
                "recall": tp / (tp + fn) if tp + fn else None,
                "agreement": (tp + tn) / max(1, tp + fp + fn + tn)}

    out["from_n0_retrain"] = rates(tp, fp, fn, tn)
    out["from_served"] = rates(stp, sfp, sfn, stn)
    budgets: dict[str, Any] = {}
    for seed in sorted({r["seed"] for r in rows}):
        for mode in sorted({r["mode"] for r in rows if r["mode"] != "random"}):
            mine = sorted((r for r in rows if r["seed"] == seed and r["mode"] == mode),
                          key=lambda r: r["n"])
            if not mine:
                continue
            n_max = mine[-1]["n"]
            es = edits[source(mine[0])]
            b = base[seed]
            paths: list[list[float]] = [[] for _ in b]
            for n in range(1, n_max + 1):
                used = first_n_per_example(es, n)
                pos = {id(e): i for i, e in enumerate(es)}
                idx = torch.tensor([pos[id(e)] for e in used], dtype=torch.long)
                pred = (delta[source(mine[0])][idx][:, cols].sum(0) / n_train).tolist()
                for k, dk in enumerate(pred):
                    paths[k].append(dk)
            predicted = [budget_of(bk, path) for bk, path in zip(b, paths, strict=True)]
            measured = []
            for k, bk in enumerate(b):
                flipped = [r["n"] for r in mine if r["margins"][k] * bk < 0]
                measured.append(float(min(flipped)) if flipped else float(n_max + 1))
            capped = [min(x, 1e6) for x in predicted]
            within = [k for k, x in enumerate(predicted) if x <= n_max]
            budgets[f"{mode}@{seed}"] = {
                "n_max": n_max, "ns": [r["n"] for r in mine],
                "spearman_predicted_vs_measured_budget": spearman(capped, measured),
                "predicted_within_n_max": len(within),
                "measured_within_n_max": sum(x <= n_max for x in measured),
                "flipped_among_predicted_within": sum(measured[k] <= n_max for k in within),
                "predicted": [None if math.isinf(x) else x for x in predicted],
                "measured": measured,
            }
    out["budget"] = budgets
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--result", type=Path, required=True, help="bench/attack.py's JSON")
    ap.add_argument("--tag", required=True, help="the attack run's --tag (names its caches)")
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/pairdots-attack"))
    ap.add_argument("--bundle", type=Path, default=Path("bundles/minilm-sst2"))
    ap.add_argument("--solvers", default="diagonal,identity,low_rank,ekfac")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = json.loads(a.result.read_text())
    rt = ModelRuntime(load_bundle(a.bundle))
    n_train = rt.n_train
    rows = [r for r in res["rows"] if r["mode"] != "none"]
    base = {r["seed"]: r["margins"] for r in res["rows"] if r["mode"] == "none"}
    first_seed = min(r["seed"] for r in res["rows"])

    def source(r: dict[str, Any]) -> str:  # the search a row applied (bench/attack.py names)
        return f"random@{r['seed']}" if r["mode"] == "random" and r["seed"] != first_seed \
            else r["mode"]

    edits: dict[str, list[Edit]] = {}
    for name in {source(r) for r in rows}:
        got = json.loads((a.cache / f"attack{a.tag}-{name}.json").read_text())
        edits[name] = edits_from_json(got["value"]["edits"])
        sample_texts = got["key"]["sample"]
    test = {e.text: e for e in read_examples(SST2 / "test.tsv")}
    sample = [test[t] for t in sample_texts]
    log(f"{len(sample)} sentences, {len(rows)} rows, modes {sorted(edits)}")

    # s_k for every sentence and solver: S [K·solvers, P]
    solvers = [s.strip() for s in a.solvers.split(",") if s.strip()]
    s_rows, keys = [], []
    for solver in solvers:
        for k, ex in enumerate(sample):
            enc = steps.encode_text(rt, ex.text)
            m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, ex.label)
            g = steps.measurement_gradient(rt, enc, m)
            x, _ = solve_s_test(rt, g, SolverSettings(method=SolverChoice(solver)), lambda: None)
            s_rows.append(x.to(rt.task.dtype))
            keys.append((solver, k))
    S = torch.stack(s_rows)  # [K·solvers, P]
    log(f"s_test for {len(sample)} sentences × {len(solvers)} solvers in "
        f"{time.perf_counter() - t0:.0f} s")

    # I(z̃_e) − I(z_e) for every edit of every mode, against every s
    delta: dict[str, torch.Tensor] = {}  # mode -> [E, K·solvers]
    for mode, es in edits.items():
        texts = [e.original_text for e in es] + [e.new_text for e in es]
        labels = [e.label for e in es] * 2
        infl = score_texts_many(rt, S, texts, labels, batch_size=64)  # I = −⟨s, ∇L⟩ [2E, K·solvers]
        delta[mode] = infl[len(es) :] - infl[: len(es)]  # [E, K·solvers]
        log(f"{mode}: {len(es)} edits scored ({time.perf_counter() - t0:.0f} s)")

    out: dict[str, Any] = {}
    for solver in solvers:
        cols = [j for j, (s, _) in enumerate(keys) if s == solver]
        pooled_all, pooled_own, pooled_meas = [], [], []
        per_row = []
        for r in rows:
            used = first_n_per_example(edits[source(r)], r["n"])
            pos = {id(e): i for i, e in enumerate(edits[source(r)])}
            idx = torch.tensor([pos[id(e)] for e in used], dtype=torch.long)
            d = delta[source(r)][idx][:, cols]  # [E_used, K]
            pred_all = (d.sum(0) / n_train).tolist()
            own_mask = torch.tensor([[e.example_index == k for k in range(len(sample))]
                                     for e in used], dtype=torch.float64)
            pred_own = ((d * own_mask).sum(0) / n_train).tolist()
            meas = [x - y for x, y in zip(r["margins"], base[r["seed"]], strict=True)]
            pooled_all += pred_all
            pooled_own += pred_own
            pooled_meas += meas
            per_row.append({
                "seed": r["seed"], "mode": r["mode"], "n": r["n"],
                "measured_mean": sum(meas) / len(meas),
                "predicted_all_mean": sum(pred_all) / len(pred_all),
                "predicted_own_mean": sum(pred_own) / len(pred_own),
                "spearman_all": spearman(pred_all, meas),
                "spearman_own": spearman(pred_own, meas),
            })
        out[solver] = {
            "flips": flip_analysis(rows, base, edits, delta, cols, n_train, source,
                                   res["sample_margins_served"]),
            "pooled_spearman_all": spearman(pooled_all, pooled_meas),
            "pooled_spearman_own": spearman(pooled_own, pooled_meas),
            "slope_measured_on_predicted_all": slope(pooled_all, pooled_meas),
            "slope_measured_on_predicted_own": slope(pooled_own, pooled_meas),
            "rows": per_row,
        }
        log(f"{solver:9s} pooled Spearman all {out[solver]['pooled_spearman_all']:+.2f} own "
            f"{out[solver]['pooled_spearman_own']:+.2f}; slope all "
            f"{out[solver]['slope_measured_on_predicted_all']:.3g}")
        fl = out[solver]["flips"]
        log(f"   flips from the n=0 retrain {fl['from_n0_retrain']}; from served "
            f"{fl['from_served']}")
        for key, bd in fl["budget"].items():
            log(f"   budget {key}: Spearman {bd['spearman_predicted_vs_measured_budget']:+.2f}, "
                f"predicted ≤ {bd['n_max']}: {bd['predicted_within_n_max']} "
                f"(of them flipped {bd['flipped_among_predicted_within']}), measured "
                f"{bd['measured_within_n_max']}")
        for pr in per_row:
            log(f"   {pr['mode']:18s} n={pr['n']:2d} measured {pr['measured_mean']:+.3f} "
                f"predicted all {pr['predicted_all_mean']:+.4g} own {pr['predicted_own_mean']:+.4g}"
                f" ρ all {pr['spearman_all']:+.2f} own {pr['spearman_own']:+.2f}")
    payload = {"bench": "attack_calibration", "attack_result": str(a.result),
               "attack_command": res.get("command"), "sentences": len(sample),
               "n_train": n_train, "solvers": out,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_result(f"attack_calibration{a.tag}", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "solvers"}
                     | {"pooled": {s: {k: v for k, v in o.items() if k != "rows"}
                                   for s, o in out.items()}}, default=lambda x: None
                     if isinstance(x, float) and math.isnan(x) else x))


if __name__ == "__main__":
    main()
