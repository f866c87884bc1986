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
budget would need). Gradients: every original and edited training text once
(per_example_loss_grads through the scoped top from h_L), contracted with all s_k at once.

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

from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.scoring import Row, pad_rows
from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_config import SolverChoice, SolverSettings
from pairdots_server.influence.solver_policy import solve_s_test
from pairdots_server.perturb.objectives import Edit
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.data import read_examples


def text_grads(rt: ModelRuntime, texts: list[str], labels: list[int], batch: int = 32) -> torch.Tensor:
    """∇θL(z) [B, P] of arbitrary labelled texts (trunk without grad, then the scoped top)."""
    assert rt.split is not None
    out = []
    for b in range(0, len(texts), batch):
        enc = rt.encode_texts(texts[b : b + batch], labels[b : b + batch])
        t = int(enc.mask.sum(dim=1).max())
        h = rt.split.trunk(enc.embeds[:, :t], enc.mask[:, :t])  # [B,t,D]
        rows = [Row(h[j, : int(enc.mask[j].sum())], enc.mask[j, : int(enc.mask[j].sum())],
                    int(enc.labels[j])) for j in range(h.shape[0])]
        hid, mask, y = pad_rows(rows)
        out.append(per_example_loss_grads(rt.split.top, rt.params, hid, mask, y))
    return torch.cat(out)


def slope(pred: list[float], meas: list[float]) -> float | None:
    sxx = sum(x * x for x in pred)
    return sum(x * y for x, y in zip(pred, meas, strict=True)) / sxx if sxx > 0 else None


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
    edits: dict[str, list[Edit]] = {}
    for mode in {r["mode"] for r in rows}:
        got = json.loads((a.cache / f"attack{a.tag}-{mode}.json").read_text())
        edits[mode] = edits_from_json(got["value"]["edits"])
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
        vals = []
        for b in range(0, len(texts), 64):
            G = text_grads(rt, texts[b : b + 64], labels[b : b + 64])  # [B, P]
            vals.append(-(G @ S.T).double())  # I = −⟨s, ∇L⟩ [B, K·solvers]
        infl = torch.cat(vals)
        delta[mode] = infl[len(es) :] - infl[: len(es)]  # [E, K·solvers]
        log(f"{mode}: {len(es)} edits scored ({time.perf_counter() - t0:.0f} s)")

    out: dict[str, Any] = {}
    for solver in solvers:
        cols = [j for j, (s, _) in enumerate(keys) if s == solver]
        pooled_all, pooled_own, pooled_meas = [], [], []
        per_row = []
        for r in rows:
            used = first_n_per_example(edits[r["mode"]], r["n"])
            pos = {id(e): i for i, e in enumerate(edits[r["mode"]])}
            idx = torch.tensor([pos[id(e)] for e in used], dtype=torch.long)
            d = delta[r["mode"]][idx][:, cols]  # [E_used, K]
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
            "pooled_spearman_all": spearman(pooled_all, pooled_meas),
            "pooled_spearman_own": spearman(pooled_own, pooled_meas),
            "slope_measured_on_predicted_all": slope(pooled_all, pooled_meas),
            "slope_measured_on_predicted_own": slope(pooled_own, pooled_meas),
            "rows": per_row,
        }
        log(f"{solver:9s} pooled Spearman all {out[solver]['pooled_spearman_all']:+.2f} own "
            f"{out[solver]['pooled_spearman_own']:+.2f}; slope all "
            f"{out[solver]['slope_measured_on_predicted_all']:.3g}")
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
