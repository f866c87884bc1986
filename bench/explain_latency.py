"""Per-stage latency of Explain (issue 4) on a prepared bundle, through explain.explain.

Configurations (each: the first call = cold for that configuration, then --sentences warm
calls on other sentences, then one repeat of a warm sentence = s_test cache hit):
  default     the server defaults: bundle solver (low-rank when the bundle has the factors),
              index prefilter with K = clamp(2 % N, 50, 2000) per direction, exact Eq. 8 token
              influence, top 3 words, 5 examples per direction;
  lissa       the same with SOLVER_LISSA, depth --lissa-depth (stops earlier on its tolerance);
  exhaustive  the default solver but no index: every training example scored exactly
              (--exhaustive-top-words words, --exhaustive-calls calls; each word costs one
              full gradient pass over the training set);
  exact_bf16  the default with TOKEN_INFLUENCE_METHOD_EXACT_BF16: Eq. 8's [UNK] copies through
              the trunk in bfloat16 (bench/eq8_precision.py measures its agreement);
  exact       the default with float32 Eq. 8 (TOKEN_INFLUENCE_METHOD_EXACT); the default itself
              is AUTO: EXACT_BF16 where the device multiplies bfloat16 natively, else EXACT;
  eq8_top     the default with Eq. 8 in top-k words mode (--eq8-top-words, settings
              eq8_top_words; bench/scope_inputs.py measures its agreement).
Exact scoring uses the runtime's scope-input cache (influence/scope_inputs.py): rows from the
bundle's scope_inputs.safetensors when present (`pairdots index scope-inputs`), else computed
on first use; the JSON records which (scope_inputs), and the load average.
Stages (summed over the explained words, explain._Timer): saliency, grad_score (∇θ w by
double backprop), solve (s_test), candidates (projection + index search), exact_scoring
(Eq. 5 on the candidates), token_influence (Eq. 8 inside the returned examples); total is
the wall time of the call, other = total - the stages. The cold call of `default` also pays
the index and low-rank loads; the cold call of `lissa` the curvature sample and λ_max.

Memory: the process's resident set (VmRSS, and the peak VmHWM) after loading and after the
last call — the same ModelRuntime a server holds per bundle. Warm p50 / p90 are over the
warm calls (distinct sentences, no s_test cache hit).

Last line: one JSON object; also bench/results/explain_latency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

from _common import default_candidates, load_runtime, log, no_stop, sample_sentences
from _results import write_result

from pairdots_server.influence.explain import ExplainAnswer, ExplainQuery, explain
from pairdots_server.influence.pipeline import TokenInfluence
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings

STAGES = ("saliency", "grad_score", "solve", "candidates", "exact_scoring", "token_influence")
FIRST_TEXT = "i loved it !"


def call(rt: ModelRuntime, q: ExplainQuery, k: int) -> tuple[dict[str, float], ExplainAnswer]:
    """One Explain call -> ({stage: seconds, total, other}, answer)."""
    ans = explain(rt, q, no_stop, default_candidates=k)
    row = {s: float(ans.timings.get(s, 0.0)) for s in STAGES}
    row["total"] = ans.total_seconds
    row["other"] = ans.total_seconds - sum(row[s] for s in STAGES)
    return row, ans


def describe(ans: ExplainAnswer) -> str:
    """Words explained, solver diagnostics and the top supporting example, for the log."""
    parts = []
    for sw in ans.explanations[0].salient_words:
        d = sw.solver
        top = sw.supporting[0].text[:40] if sw.supporting else "-"
        parts.append(f"{sw.text!r} [{d['method']} it={d['iterations']} conv={d['converged']}"
                     f"{' cached' if d.get('cached') else ''}] top+: {top!r}")
    return "; ".join(parts)


def run_config(
    rt: ModelRuntime, name: str, base: ExplainQuery, texts: list[str], k: int
) -> dict[str, object]:
    """Cold call on texts[0], warm calls on texts[1:], and a cache-hit repeat of texts[1]."""
    calls: list[dict[str, float]] = []
    for i, text in enumerate(texts):
        row, ans = call(rt, replace(base, text=text), k)
        calls.append(row)
        kind = "cold" if i == 0 else "warm"
        log(f"[{name}] {kind} {text[:50]!r}: total {row['total']:.2f}s "
            + " ".join(f"{s}={row[s]:.2f}" for s in STAGES)
            + f" | scored {ans.candidates_scored} | {describe(ans)}")
        for w in ans.warnings:
            log(f"    warning: {w}")
    out: dict[str, object] = {"cold": calls[0], "calls": calls[1:]}
    warm = calls[1:]
    if warm:
        out["warm_mean"] = {s: statistics.fmean(c[s] for c in warm) for s in warm[0]}
        totals = sorted(c["total"] for c in warm)
        out["warm_p50"] = statistics.median(totals)
        out["warm_p90"] = totals[min(len(totals) - 1, round(0.9 * (len(totals) - 1)))]
        row, ans = call(rt, replace(base, text=texts[1]), k)
        out["cache_hit"] = row
        log(f"[{name}] repeat (s_test cached) {texts[1][:50]!r}: total {row['total']:.2f}s "
            f"solve {row['solve']:.3f}s")
    out["candidates_scored"] = ans.candidates_scored
    out["top_words"] = base.top_words
    return out


def rss_mb() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process in MB, from /proc/self/status."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--sentences", type=int, default=3, help="warm calls per configuration")
    ap.add_argument("--configs", default="default,lissa,exhaustive",
                    help="comma-separated subset of default,lissa,exhaustive,exact,exact_bf16,"
                         "eq8_top")
    ap.add_argument("--lissa-depth", type=int, default=200, help="LiSSA max iterations")
    ap.add_argument("--exhaustive-top-words", type=int, default=1)
    ap.add_argument("--exhaustive-calls", type=int, default=1,
                    help="exhaustive calls (1 = only the cold one)")
    ap.add_argument("--eq8-top-words", type=int, default=3, help="k of the eq8_top config")
    ap.add_argument("--seed", type=int, default=1, help="seed of the SST-2 test sample")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--result-name", default="explain_latency",
                    help="bench/results/<name>.json")
    args = ap.parse_args()

    rt, load_s = load_runtime(args.bundle, args.threads)
    rss_loaded = rss_mb()
    k = default_candidates(rt.n_train)
    log(f"bundle {rt.name}: N={rt.n_train}, P={rt.num_params}, index={rt.has_index}, "
        f"low-rank={rt.has_lowrank}, K={k}/direction, threads {args.threads}, "
        f"loaded in {load_s:.1f}s")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    per = args.sentences + 1
    pool = [FIRST_TEXT] + [t for t, _ in sample_sentences(per * len(configs), args.seed)]
    results: dict[str, object] = {}
    for ci, name in enumerate(configs):
        texts = pool[ci * per : (ci + 1) * per]
        if name == "default":
            base = ExplainQuery(text="")
        elif name == "lissa":
            base = ExplainQuery(text="", influence=InfluenceSettings(solver=SolverSettings(
                method=SolverChoice.LISSA, max_iterations=args.lissa_depth)))
        elif name == "exhaustive":
            base = ExplainQuery(text="", influence=InfluenceSettings(use_index=False),
                                top_words=args.exhaustive_top_words)
            texts = texts[: max(1, args.exhaustive_calls)]
        elif name == "exact_bf16":
            base = ExplainQuery(text="", token_influence=TokenInfluence.EXACT_BF16)
        elif name == "exact":
            base = ExplainQuery(text="", token_influence=TokenInfluence.EXACT)
        elif name == "eq8_top":
            base = ExplainQuery(text="", influence=InfluenceSettings(
                eq8_top_words=args.eq8_top_words))
        else:
            raise SystemExit(f"unknown configuration {name!r}; use default, lissa, exhaustive, "
                             "exact, exact_bf16, eq8_top")
        results[name] = run_config(rt, name, base, texts, k)

    log("")
    log(f"{'config':>10} {'call':>6} " + " ".join(f"{s[:10]:>10}" for s in STAGES)
        + f" {'other':>7} {'total':>8}")
    for name, res in results.items():
        assert isinstance(res, dict)
        for kind in ("cold", "warm_mean", "cache_hit"):
            row = res.get(kind)
            if row:
                log(f"{name:>10} {kind[:6]:>6} " + " ".join(f"{row[s]:10.3f}" for s in STAGES)
                    + f" {row['other']:7.3f} {row['total']:8.2f}")
    rss_end = rss_mb()
    log(f"RSS after load {rss_loaded.get('VmRSS', 0):.0f} MB, after the calls "
        f"{rss_end.get('VmRSS', 0):.0f} MB (peak {rss_end.get('VmHWM', 0):.0f} MB)")
    index_info: dict[str, object] = {}
    if rt.has_index:
        index, projection = rt.index()
        index_info = {"index": index.describe(), "projection": projection.describe()}
    cache = rt.scope_inputs()
    scope_inputs: dict[str, object] = {"split": rt.split.key if rt.split else None}
    if cache is not None:
        scope_inputs.update(loaded=cache.loaded, computed=cache.computed, dtype=cache.dtype,
                            bytes=cache.nbytes, note=rt.scope_inputs_note)
    with open("/proc/loadavg") as fh:
        loadavg = fh.read().split()[:3]
    result = {
        "bench": "explain_latency", "bundle": rt.name, "bundle_path": args.bundle,
        "scope_inputs": scope_inputs, "loadavg_at_end": loadavg,
        "n_train": rt.n_train, "scope_parameters": rt.num_params, "candidates": k,
        "threads": args.threads, "lissa_depth": args.lissa_depth, "load_seconds": load_s,
        "rss_mb_after_load": rss_loaded, "rss_mb_after_calls": rss_end, **index_info,
        "configs": results,
    }
    write_result(args.result_name, result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
