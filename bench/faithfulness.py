"""Does influence predict retraining? LDS and the removal test on a bundle (issue: explanations
that mean what they say).

Ground truth: retrain the influence scope (last encoder layer + pooler + classifier) from the
served model θ* on a modified training set, minimising the mean cross-entropy plus the proximal
term (λ/2)‖θ − θ*‖² with Adam (the response that damped influence approximates, Bae et al. 2022).
The frozen layers below the scope do not change, so the hidden states entering the scope are
computed once and cached; a retrain then costs one transformer layer per example and epoch.

* LDS (Park et al. 2023, TRAK): for `--subsets` random 50 % subsets S, the Spearman correlation
  over subsets between the predicted Σ_{i∈S} I(z_i, f) and the measured f(θ_S), per query,
  averaged over `--queries` SST-2 test sentences.
* Removal: remove the top 1 % supporting examples of a query (largest I) vs 1 % random ones,
  retrain, and compare f with the retrain on the full set (same seed and batch order): removing
  supporters should lower f. Reported: fraction of queries where it did, and the mean changes.

Measurements f: pred (margin of the predicted label) and occ (c_w of the top occlusion word,
core/measure.py). Curvatures: the service's solvers with their default damping (identity,
low_rank, diagonal, ekfac from the bundle's artifacts; `--curvatures`). LiSSA is left out by
default: one solve costs about two minutes on this CPU.

  python3 bench/faithfulness.py --bundle bundles/minilm-sst2 --queries 20 --subsets 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from _common import load_runtime, log, sample_sentences
from _influence import training_pass
from _results import write_result
from torch import Tensor
from torch.func import functional_call

from pairdots_server.core.measure import (
    grad_theta_margin,
    grad_theta_occlusion,
    margin,
    occlude,
    word_occlusion,
)
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings, solve_s_test
from pairdots_server.influence.wordmatch import words_of


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den > 0 else float("nan")


class ScopeModel:
    """The scope as a function of its parameters on cached hidden states h [B,T,D] entering the
    last encoder layer: logits = classifier(pooler(layer_L(h))) (dropout off)."""

    def __init__(self, rt: ModelRuntime) -> None:
        model = rt.task.model
        self.model = model
        self.layers = model.bert.encoder.layer
        self.last = len(self.layers) - 1
        self.prefix = f"bert.encoder.layer.{self.last}."
        self.rt = rt

    def _sub(self, params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}

    def logits(self, params: Mapping[str, Tensor], hidden: Tensor, mask: Tensor) -> Tensor:
        mask4 = self.rt.task.additive_mask(mask, hidden.dtype)
        out = functional_call(
            self.layers[self.last], self._sub(params, self.prefix), (hidden,),
            {"attention_mask": mask4},
        )
        h = out[0] if isinstance(out, tuple) else out
        pooled = functional_call(self.model.bert.pooler, self._sub(params, "bert.pooler."), (h,))
        return functional_call(self.model.classifier, self._sub(params, "classifier."), (pooled,))

    def hidden(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """Hidden states entering the last layer: [B,T,D] embeddings -> [B,T,D]."""
        with torch.no_grad():
            out = self.model.bert(
                inputs_embeds=embeds,
                attention_mask=self.rt.task.additive_mask(mask, embeds.dtype),
                output_hidden_states=True,
            )
        return out.hidden_states[-2]


def pad(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    t = max(r.shape[0] for r in rows)
    h = torch.zeros(len(rows), t, rows[0].shape[1])
    m = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        h[i, : r.shape[0]] = r
        m[i, : r.shape[0]] = 1
    return h, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="bundles/minilm-sst2")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--subsets", type=int, default=30)
    ap.add_argument("--removal-queries", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="faithfulness")
    ap.add_argument("--curvatures", default="identity,low_rank,diagonal,ekfac",
                    help="solvers (SolverChoice values) whose influence is checked")
    ap.add_argument("--removal-curvatures", default="ekfac,identity")
    ap.add_argument("--prox", type=float, default=0.05,
                    help="λ of the proximal term (λ/2)‖θ − θ*‖² of the retrain objective")
    args = ap.parse_args()

    rt, _ = load_runtime(args.bundle, args.threads)
    task, train = rt.task, rt.bundle.train
    n = rt.n_train
    sm = ScopeModel(rt)
    theta0 = {k: v.detach().clone() for k, v in rt.params.items()}
    prox = args.prox

    # -- cache the hidden states entering the scope ----------------------------------------
    t0 = time.perf_counter()
    hidden: list[Tensor] = [torch.empty(0)] * n
    order = sorted(range(n), key=lambda i: len(train[i].text))
    for b in range(0, n, 64):
        idx = order[b : b + 64]
        enc = rt.encode_train(idx)
        h = sm.hidden(enc.embeds, enc.mask)
        for j, i in enumerate(idx):
            hidden[i] = h[j, : int(enc.mask[j].sum())].clone()
    labels = torch.tensor([ex.label for ex in train])
    log(f"cached scope inputs of {n} examples in {time.perf_counter() - t0:.0f} s")

    # -- queries: measurement gradients and their cached inputs ----------------------------
    queries = []
    grads = []
    for text, _gold in sample_sentences(args.queries * 2, args.seed, "test"):
        enc = task.encode([text], max_length=rt.max_length)
        e = task.embed(enc.input_ids).detach()
        with torch.no_grad():
            y = int(task.logits_fn(rt.params, e, enc.attention_mask).argmax())
        wid, words = enc.word_ids[0], enc.words[0]
        c = word_occlusion(task.logits_fn, rt.params, e, enc.attention_mask, y, wid, len(words),
                           rt.unk_embed)
        cand = [i for i in range(len(words)) if words_of(words[i]) and i in wid]
        if not cand:
            continue
        w = max(cand, key=lambda i: float(c[i]))
        pos = [t for t, k in enumerate(wid) if k == w]
        e_occ = occlude(e, pos, rt.unk_embed)
        h2 = sm.hidden(torch.cat([e, e_occ]), enc.attention_mask.expand(2, -1))
        # sanity: the scope model reproduces the served logits
        torch.testing.assert_close(
            sm.logits(rt.params, h2[:1], enc.attention_mask),
            task.logits_fn(rt.params, e, enc.attention_mask), atol=1e-4, rtol=1e-4,
        )
        queries.append({"text": text, "pred": y, "word": words[w], "h": h2,
                        "mask": enc.attention_mask.expand(2, -1)})
        grads.append(grad_theta_margin(task.logits_fn, rt.params, e, enc.attention_mask, y))
        grads.append(grad_theta_occlusion(task.logits_fn, rt.params, e, enc.attention_mask, y,
                                          pos, rt.unk_embed))
        if len(queries) == args.queries:
            break
    G = torch.stack(grads, 1).float()  # [P, 2Q]: columns pred0, occ0, pred1, occ1, ...
    # s_test per curvature with the service's own solver policy and default damping
    blocks, damping = [], {}
    for name in args.curvatures.split(","):
        settings = SolverSettings(method=SolverChoice(name))
        cols = []
        for j in range(G.shape[1]):
            x, diag = solve_s_test(rt, G[:, j].to(rt.task.dtype), settings, lambda: None)
            cols.append(x.float())
        damping[name] = {k: diag.get(k) for k in ("effective_damping", "damping_rule")}
        blocks.append(torch.stack(cols, 1))
    names = args.curvatures.split(",")
    t_pass = time.perf_counter()
    outs, _ = training_pass(rt, blocks, 32, False)
    pass_s = time.perf_counter() - t_pass
    del blocks, G
    scores = dict(zip(names, outs))  # [N, 2Q] each

    def measure(params: Mapping[str, Tensor]) -> list[tuple[float, float]]:
        out = []
        with torch.no_grad():
            for q in queries:
                m = margin(sm.logits(params, q["h"], q["mask"]), torch.tensor([q["pred"]] * 2))
                out.append((float(m[0]), float(m[0] - m[1])))
        return out

    def retrain(keep: Sequence[int], seed: int) -> list[tuple[float, float]]:
        """Adam from θ* on the examples `keep`. Every retrain of a seed visits the examples
        in the order of ONE permutation of the whole training set, filtered to `keep`, so
        two retrains differ by the examples left out, not by a reshuffle."""
        theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        opt = torch.optim.Adam(theta.values(), lr=args.lr)
        rng = random.Random(seed)
        kept = set(keep)
        for _ in range(args.epochs):
            full = list(range(n))
            rng.shuffle(full)
            perm = [i for i in full if i in kept]
            for b in range(0, len(perm), args.batch_size):
                idx = perm[b : b + args.batch_size]
                h, m = pad([hidden[i] for i in idx])
                loss = F.cross_entropy(sm.logits(theta, h, m), labels[idx])
                loss = loss + 0.5 * prox * sum(
                    ((theta[k] - theta0[k]) ** 2).sum() for k in theta
                ) / len(keep)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return measure({k: v.detach() for k, v in theta.items()})

    # -- LDS ----------------------------------------------------------------------------------
    t1 = time.perf_counter()
    rng = random.Random(args.seed)
    subsets = [sorted(rng.sample(range(n), n // 2)) for _ in range(args.subsets)]
    actual = []
    for k, s in enumerate(subsets):
        actual.append(retrain(s, seed=0))
        log(f"subset {k + 1}/{len(subsets)} retrained ({time.perf_counter() - t1:.0f} s)")
    lds: dict[str, dict[str, float]] = {}
    for curv, sc in scores.items():
        for mi, meas in enumerate(("pred", "occ")):
            vals = []
            for qi in range(len(queries)):
                col = sc[:, 2 * qi + mi]
                pred = [float(col[s].sum()) for s in subsets]
                vals.append(spearman(pred, [a[qi][mi] for a in actual]))
            lds[f"{meas}/{curv}"] = {"lds": statistics.fmean(vals), "per_query": vals}
            log(f"LDS {meas}/{curv}: {statistics.fmean(vals):.3f}")
    lds_s = time.perf_counter() - t1
    meta = {
        "bundle": args.bundle, "queries": [{"text": q["text"], "word": q["word"]} for q in queries],
        "retrain": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                    "proximal_lambda": prox, "optimizer": "adam"},
        "subsets": len(subsets), "lds": lds, "damping": damping,
    }
    write_result(args.name, {**meta, "seconds": {"exact_pass": pass_s, "lds": lds_s},
                             "removal": "not run yet"})

    # -- removal test -----------------------------------------------------------------------
    t2 = time.perf_counter()
    k_rm = max(1, n // 100)
    if args.removal_queries <= 0:
        log("removal test skipped (--removal-queries 0)")
        return
    base = retrain(range(n), seed=0)
    removal: dict[str, dict[str, float]] = {}
    rq = min(args.removal_queries, len(queries))
    rnd = []
    for qi in range(rq):
        drop = set(random.Random(100 + qi).sample(range(n), k_rm))
        after = retrain([i for i in range(n) if i not in drop], seed=0)
        rnd.append([after[qi][mi] - base[qi][mi] for mi in range(2)])
    for curv in args.removal_curvatures.split(","):
        for mi, meas in enumerate(("pred", "occ")):
            deltas = []
            for qi in range(rq):
                col = scores[curv][:, 2 * qi + mi]
                drop = {int(i) for i in torch.argsort(col, descending=True)[:k_rm]}
                after = retrain([i for i in range(n) if i not in drop], seed=0)
                deltas.append(after[qi][mi] - base[qi][mi])
            removal[f"{meas}/{curv}"] = {
                "fraction_lowered": sum(d < 0 for d in deltas) / len(deltas),
                "mean_change": statistics.fmean(deltas),
                "random_mean_change": statistics.fmean(r[mi] for r in rnd),
                "per_query": deltas,
            }
            log(f"removal {meas}/{curv}: lowered in "
                f"{removal[f'{meas}/{curv}']['fraction_lowered']:.2f}, mean "
                f"{statistics.fmean(deltas):+.4f} (random "
                f"{removal[f'{meas}/{curv}']['random_mean_change']:+.4f})")
    path = write_result(args.name, {
        **meta, "removed_per_query": k_rm, "removal": removal,
        "seconds": {"exact_pass": pass_s, "lds": lds_s, "removal": time.perf_counter() - t2},
    })
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
