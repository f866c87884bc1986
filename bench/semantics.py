"""Do the pairings mean what they say? Identical-class and word-presence tests on a bundle.

For ≥ 100 SST-2 test sentences and every (measurement × curvature × candidate rule), the top-5
supporting training examples by exact, exhaustive influence I(z, f) = -∇θfᵀ H⁻¹ ∇θL(z):

* identical class (Hanawa et al., ICLR 2021): fraction of the top 5 whose gold label is the
  explained (predicted) label;
* presence: fraction of the top 5 that contain the salient word (same Porter stem) or a WordNet
  synonym of it, next to the word's base rate among training examples of that label;
* overlap: Jaccard of the supporting lists of the sentence's two top words.

Measurements (core/measure.py, core/saliency.py):
  pred     f = margin z_y − max z_c (prediction level)
  occ      f = c_w = margin(x) − margin(x with w → [UNK]), words ranked by c_w (signed: the
           words that push the prediction most)
  pred_w   f = margin, candidates restricted to examples containing the top occlusion word
  l2logp   the first-wave default: w = ‖∇_e log p_y‖ summed over the word's pieces, words ranked
           by it (double backprop)
Curvatures: the service's solvers with their default damping (`--curvatures`): identity
(gradient dot product), low_rank (the bundle's rank-k GGN + 0.01 λ_max), diagonal (empirical
Fisher diagonal over the whole training set + 0.1 × its mean), ekfac (EK-FAC of the sampled
Fisher per Linear layer of the scope over the whole training set, 0.1 × mean eigenvalue per
block; diagonal for LayerNorm). ekfac/diagonal need `pairdots curvature fit` on the bundle.
Candidate rules: all (every training example) and present (only examples containing the word).

Scoring is exhaustive and exact: one pass of per-example gradients over the training set
scores every query at once (-G S for the stacked s_test vectors S).

  python3 bench/semantics.py --bundle bundles/minilm-sst2 --n 100
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from _common import load_runtime, log, sample_sentences
from _influence import training_pass
from _results import write_result
from torch import Tensor

from pairdots_server.core.measure import grad_theta_margin, grad_theta_occlusion, word_occlusion
from pairdots_server.core.saliency import (
    Target,
    TokenScore,
    grad_theta_word_score,
    token_saliency,
    word_scores,
)
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings, solve_s_test
from pairdots_server.influence.wordmatch import WordIndex, stem, words_of
from pairdots_server.perturb.lexicon import default_lexicon


def is_wordlike(word: str) -> bool:
    return bool(words_of(word))


def top_supporting(scores: Tensor, allowed: list[int] | None, k: int) -> list[int]:
    if allowed is not None:
        sub = scores[allowed]
        order = torch.argsort(sub, descending=True)[:k]
        return [allowed[int(i)] for i in order if float(sub[int(i)]) > 0]
    order = torch.argsort(scores, descending=True)[:k]
    return [int(i) for i in order if float(scores[int(i)]) > 0]


def jaccard(a: list[int], b: list[int]) -> float:
    if not a and not b:
        return float("nan")
    return len(set(a) & set(b)) / len(set(a) | set(b))


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="bundles/minilm-sst2")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--name", default="semantics")
    ap.add_argument("--curvatures", default="identity,low_rank,diagonal,ekfac",
                    help="solvers (SolverChoice values) to compare")
    ap.add_argument("--per-pass", type=int, default=2,
                    help="curvatures scored per exact pass over the training set (memory)")
    args = ap.parse_args()

    rt, load_s = load_runtime(args.bundle, args.threads)
    task = rt.task
    train = rt.bundle.train
    train_labels = [ex.label for ex in train]
    widx = WordIndex([ex.text for ex in train])
    lex = default_lexicon()
    sentences = sample_sentences(args.n, args.seed, "test")
    log(f"loaded {args.bundle} in {load_s:.1f} s; {len(sentences)} sentences")

    # -- per sentence: prediction, top words, measurement gradients -----------------------
    rows: list[dict[str, object]] = []
    grads: list[Tensor] = []  # measurement gradients, columns of the query matrix
    t0 = time.perf_counter()
    for si, (text, gold) in enumerate(sentences):
        enc = task.encode([text], max_length=rt.max_length)
        with torch.no_grad():
            embeds = task.embed(enc.input_ids).detach()
            logits = task.logits_fn(rt.params, embeds, enc.attention_mask)
        y = int(logits.argmax())
        word_ids, words = enc.word_ids[0], enc.words[0]
        occ = word_occlusion(
            task.logits_fn, rt.params, embeds, enc.attention_mask, y, word_ids, len(words),
            rt.unk_embed,
        )  # [W]
        cand = [i for i in range(len(words)) if is_wordlike(words[i]) and any(
            w == i for w in word_ids)]
        if len(cand) < 2:
            continue
        by_occ = sorted(cand, key=lambda i: (-float(occ[i]), i))[:2]
        l2 = word_scores(token_saliency(
            task.logits_fn, rt.params, embeds, enc.attention_mask, y, Target.LOG_PROB,
            TokenScore.L2_NORM, baseline=rt.unk_embed,
        ), word_ids, len(words))
        by_l2 = sorted(cand, key=lambda i: (-abs(float(l2[i])), i))[:2]
        pos = {i: [t for t, w in enumerate(word_ids) if w == i] for i in set(by_occ + by_l2)}
        entry: dict[str, object] = {
            "text": text, "gold": gold, "pred": y, "words": words,
            "occ_words": [words[i] for i in by_occ],
            "occ_values": [float(occ[i]) for i in by_occ],
            "l2_words": [words[i] for i in by_l2], "col": {},
        }
        cols: dict[str, int] = {}

        def add(key: str, g: Tensor, cols: dict[str, int] = cols) -> None:
            cols[key] = len(grads)
            grads.append(g.float())

        add("pred", grad_theta_margin(task.logits_fn, rt.params, embeds, enc.attention_mask, y))
        for r, wi in enumerate(by_occ):
            add(f"occ{r}", grad_theta_occlusion(
                task.logits_fn, rt.params, embeds, enc.attention_mask, y, pos[wi], rt.unk_embed,
            ))
        for r, wi in enumerate(by_l2):
            add(f"l2logp{r}", grad_theta_word_score(
                task.logits_fn, rt.params, embeds, enc.attention_mask, y, Target.LOG_PROB,
                TokenScore.L2_NORM, pos[wi], baseline=rt.unk_embed,
            ))
        entry["col"] = cols
        rows.append(entry)
        if si % 20 == 0:
            log(f"sentence {si}: {text[:50]!r} occ={entry['occ_words']} l2={entry['l2_words']}")
    grad_s = time.perf_counter() - t0
    G = torch.stack(grads, dim=1)  # [P,M]
    m = G.shape[1]
    log(f"{len(rows)} sentences, {m} measurement gradients in {grad_s:.0f} s")

    # -- s_test per curvature (the service's solvers, default damping), exact passes --------
    # Curvatures go `--per-pass` at a time: every block is [P, M] float32 (≈ 3.8 GB for 100
    # sentences on MiniLM's 1.92 M scoped parameters).
    names = args.curvatures.split(",")
    damping: dict[str, dict[str, object]] = {}
    all_scores: dict[str, Tensor] = {}
    solve_s = pass_s = 0.0
    for g0 in range(0, len(names), args.per_pass):
        group = names[g0 : g0 + args.per_pass]
        blocks = []
        t_solve = time.perf_counter()
        for name in group:
            settings = SolverSettings(method=SolverChoice(name))
            cols = []
            for j in range(m):
                x, diag = solve_s_test(rt, G[:, j].to(task.dtype), settings, lambda: None)
                cols.append(x.float())
            damping[name] = {k: diag.get(k) for k in ("effective_damping", "damping_rule")}
            blocks.append(torch.stack(cols, 1))
            del cols
        solve_s += time.perf_counter() - t_solve
        t1 = time.perf_counter()
        outs, _ = training_pass(rt, blocks, args.batch_size, False)
        pass_s += time.perf_counter() - t1
        del blocks
        all_scores.update(zip(group, outs))
        log(f"{group}: solves and exact pass done ({time.perf_counter() - t_solve:.0f} s)")
    del G

    # -- metrics ---------------------------------------------------------------------------
    def family(word: str) -> set[str]:
        return {stem(word)} | {stem(s) for s in lex.synonyms(word.lower(), limit=50)}

    def contains(i: int, fam: set[str]) -> bool:
        return any(stem(w) in fam for w in words_of(train[i].text))

    n_label = {c: sum(1 for lab in train_labels if lab == c) for c in set(train_labels)}
    results: dict[str, dict[str, float]] = {}
    per_query: list[dict[str, object]] = []
    for curv, sc in all_scores.items():
        for meas in ("pred", "occ", "l2logp", "pred_w"):
            for rule in ("all", "present") if meas in ("occ", "l2logp") else (
                ("present",) if meas == "pred_w" else ("all",)
            ):
                ident, pres, base, over, opp_ident = [], [], [], [], []
                for row in rows:
                    cols = row["col"]  # type: ignore[assignment]
                    y = int(row["pred"])  # type: ignore[arg-type]
                    if meas == "pred":
                        top = top_supporting(sc[:, cols["pred"]], None, args.top)
                        bottom = top_supporting(-sc[:, cols["pred"]], None, args.top)
                        ident.append(mean([float(train_labels[i] == y) for i in top]))
                        opp_ident.append(mean([float(train_labels[i] == y) for i in bottom]))
                        continue
                    wlist = row["l2_words" if meas == "l2logp" else "occ_words"]  # type: ignore
                    tops = []
                    for r in range(2):
                        col = sc[:, cols["pred" if meas == "pred_w" else f"{meas}{r}"]]
                        allowed = widx.containing(wlist[r]) if rule == "present" else None
                        if allowed is not None and not allowed:
                            allowed = None
                        tops.append(top_supporting(col, allowed, args.top))
                    top = tops[0]
                    fam = family(wlist[0])
                    ident.append(mean([float(train_labels[i] == y) for i in top]))
                    pres.append(mean([float(contains(i, fam)) for i in top]))
                    b = sum(1 for i in widx.containing(wlist[0]) if train_labels[i] == y)
                    base.append(b / n_label[y])
                    over.append(jaccard(tops[0], tops[1]))
                    per_query.append({
                        "curvature": curv, "measurement": meas, "rule": rule,
                        "text": row["text"], "word": wlist[0], "pred": y,
                        "top": [[i, train[i].text, train_labels[i]] for i in top],
                    })
                key = f"{meas}/{curv}/{rule}"
                res = {"identical_class": mean(ident), "queries": len(ident)}
                if meas == "pred":
                    res["opposing_identical_class"] = mean(opp_ident)
                else:
                    res["contains_word"] = mean(pres)
                    res["base_rate"] = mean(base)
                    res["contains_over_base"] = mean(pres) / max(mean(base), 1e-12)
                    res["top2_jaccard"] = mean(over)
                results[key] = res
                log(f"{key:28s} " + " ".join(
                    f"{k}={v:.3f}" for k, v in res.items() if isinstance(v, float)))
    path = write_result(args.name, {
        "bundle": args.bundle, "sentences": len(rows), "seed": args.seed,
        "measurement_gradients": m, "damping": damping,
        "seconds": {"load": load_s, "gradients": grad_s, "solves": solve_s, "exact_pass": pass_s},
        "results": results,
        "examples": [q for q in per_query if q["text"] == rows[0]["text"]],
    })
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
