"""Eq. 8 with the trunk's matrix products in bfloat16 against float32, on a prepared bundle.

For each of --sentences SST-2 test sentences: the default Explain (float32), then the returned
training examples of every label (salient words' and prediction-level supporting / opposing)
get exact Eq. 8 again, per word, with the margin s_test of their label (the default word
measurement's s_test) and the trunk under torch.autocast(bfloat16) (ScopeSplit.trunk_in);
the float32 reference is recomputed the same way. Reported per returned example:

  responsible word   the word of largest total in the example's direction (sign of I(z, f)),
                     as Explain reports it: agreement of bf16 with float32;
  spearman           Spearman of the word totals;
  rel_err            max |Δ| / max |total| over the example's words;
  gaps               for the examples where the two disagree: float32's lead of its responsible
                     word over bfloat16's choice, and of its responsible word over its runner-up
                     (both relative to the largest |total|), against that lead's median over
                     every example: whether the disagreements are near-ties;
  seconds            Eq. 8 of all returned examples, float32 vs bfloat16, interleaved.

Last line: one JSON object; also bench/results/<--result-name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import load_runtime, log, no_stop, sample_sentences
from _perturb_common import spearman
from _results import write_result

from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.explain import ExplainQuery, explain
from pairdots_server.influence.settings import InfluenceSettings


def responsible(totals: list[float], sign: float) -> int:
    """The word of largest total in the example's direction (Explain's responsible word)."""
    return max(range(len(totals)), key=lambda w: (sign * totals[w], -w))


def top2_gap(totals: list[float], sign: float) -> float:
    """How far the responsible word's total leads the runner-up's, in the example's direction
    (0 for a one-word example)."""
    ranked = sorted((sign * v for v in totals), reverse=True)
    return ranked[0] - ranked[1] if len(ranked) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--sentences", type=int, default=10)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--result-name", default="eq8_precision")
    args = ap.parse_args()

    rt, _ = load_runtime(args.bundle, args.threads)
    settings = InfluenceSettings().resolve(rt, default_candidates=50)
    rows: list[dict[str, float | int]] = []
    seconds = {"float32": 0.0, "bfloat16": 0.0}
    for text, _gold in sample_sentences(args.sentences, args.seed):
        ans = explain(rt, ExplainQuery(text=text), no_stop, default_candidates=50)
        enc = steps.encode_text(rt, text)
        for lab in ans.explanations:
            returned: dict[int, float] = {}
            groups = [(sw.supporting, sw.opposing) for sw in lab.salient_words]
            if lab.prediction is not None:
                groups.append((lab.prediction.supporting, lab.prediction.opposing))
            for sup, opp in groups:
                for ex in [*sup, *opp]:
                    returned[ex.train_index] = ex.influence
            m = steps.Measurement(steps.MeasurementKind.PREDICTION_MARGIN, lab.label)
            s, _ = steps.measurement_s_test(rt, enc, m, settings, no_stop)
            ids = list(returned)
            got: dict[str, list[steps.WordAttribution]] = {}
            for name, method in (("float32", steps.TokenInfluence.EXACT),
                                 ("bfloat16", steps.TokenInfluence.EXACT_BF16)):
                t0 = time.perf_counter()
                got[name] = steps.word_attributions(rt, s, ids, method)
                seconds[name] += time.perf_counter() - t0
            for i, ref, low in zip(ids, got["float32"], got["bfloat16"], strict=True):
                sign = 1.0 if returned[i] >= 0 else -1.0
                scale = max(abs(v) for v in ref.totals) or 1.0
                r32, r16 = responsible(ref.totals, sign), responsible(low.totals, sign)
                rows.append({
                    "train_index": i,
                    "words": len(ref.totals),
                    "agree": int(r32 == r16),
                    # float32's margin of its responsible word over bfloat16's choice, and
                    # over its own runner-up (relative to the largest |total|)
                    "gap": sign * (ref.totals[r32] - ref.totals[r16]) / scale,
                    "top2_gap": top2_gap(ref.totals, sign) / scale,
                    "spearman": spearman(ref.totals, low.totals),
                    "rel_err": max(abs(a - b) for a, b in zip(ref.totals, low.totals,
                                                               strict=True)) / scale,
                })
        log(f"{text[:50]!r}: {len(rows)} examples so far, agreement "
            f"{statistics.fmean(r['agree'] for r in rows):.3f}")
    sp = [float(r["spearman"]) for r in rows if r["spearman"] == r["spearman"]]
    errs = sorted(float(r["rel_err"]) for r in rows)
    result = {
        "bench": "eq8_precision", "bundle": rt.name, "sentences": args.sentences,
        "seed": args.seed, "threads": args.threads, "examples": len(rows),
        "responsible_word_agreement": statistics.fmean(r["agree"] for r in rows),
        "spearman_mean": statistics.fmean(sp), "spearman_min": min(sp),
        "rel_err_median": statistics.median(errs), "rel_err_p90": errs[int(0.9 * (len(errs) - 1))],
        "rel_err_max": errs[-1], "seconds": seconds,
        "disagreement_gaps": sorted(float(r["gap"]) for r in rows if not r["agree"]),
        "top2_gap_median": statistics.median(float(r["top2_gap"]) for r in rows),
        "top2_gap_median_disagreeing": statistics.median(
            [float(r["top2_gap"]) for r in rows if not r["agree"]] or [float("nan")]),
        "speedup": seconds["float32"] / seconds["bfloat16"],
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    log(json.dumps(result, indent=1))
    write_result(args.result_name, result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
