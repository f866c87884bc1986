"""Does influence predict retraining? LDS and the removal test on a bundle (issue 11: explanations
that mean what they say), in resumable phases that cache everything they measure.

Ground truth: retrain the influence scope (last encoder layer + pooler + classifier) from the
served model θ* on a modified training set, minimising the mean cross-entropy plus the proximal
term (λ/2N')‖θ − θ*‖² (N' = examples kept) with Adam (the response that damped influence
approximates, Bae et al. 2022). The frozen layers below the scope do not change, so the hidden
states entering the scope are computed once and cached; a retrain then costs one transformer
layer per example and epoch.

Every retrain follows ONE batch plan per epoch (a seeded permutation of the whole training set,
cut into chunks of 8 batches sorted by length so padding stays small, the batches shuffled):
a retrain on a subset runs the same batches with the left-out examples dropped, so two retrains
differ by the examples left out, not by a reshuffle or a different number of steps.

* LDS (Park et al. 2023, TRAK): for `--subsets` random 50 % subsets S, the Spearman correlation
  over subsets between the predicted Σ_{i∈S} I(z_i, f) and the measured f(θ_S), per query; the
  mean over queries (and its standard error) is reported, with every per-query value.
* Removal: for each query, remove the top 1 % supporting examples (largest I(z, f)) and retrain;
  removing supporters should lower f (I > 0 = training more on z raises f). Reported per
  attribution and measurement: the fraction of queries where f went down, the fraction where it
  went down more than the mean of `--random-removals` retrains without 1 % random examples,
  the mean changes, and every per-query change.

Measurements f: pred (margin m_y of the predicted label, prediction level), occ (c_w of the top
occlusion word, core/measure.py), and pred_w (LDS only, from the same retrains: the margin
predicted by the examples that contain the top word alone, Σ_{i∈S∩C_w} I(z_i, m_y) — the
default word-level pairing ranks exactly those). Attributions: the service's solvers with
their default damping (identity, low_rank, diagonal, ekfac; lissa costs ~2 min per solve here)
and the diagonal Fisher at other damping scales, `diagonal@<scale>` = d + scale · mean(d).

Phases (`--phase`, default all, each resumable; `--budget-min` stops starting retrains after that
many minutes so a run fits one hold of the shared lock — rerun to continue):
  prepare  cache the scope's inputs, the queries, ∇θf per query and the exact scores of every
           attribution (one pass of per-example gradients; new attributions are added later
           without recomputing the others)
  lds      the subset retrains (each saved as soon as it is done)
  removal  the removal retrains (base, random, then top-1 % per measurement × attribution ×
           query in the order of --removal-attributions); `all` runs the default's
           prediction-level removals before the LDS retrains and the rest after them
  report   LDS and removal figures from the cache -> bench/results/<name>.json (no retraining,
           no bundle: recompute for any attribution that is cached)

  flock /work/heavy.lock python3 bench/faithfulness.py --bundle bundles/minilm-sst2 \\
      --queries 20 --subsets 30 --removal-queries 10 --budget-min 18
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from pairdots_server.influence.wordmatch import WordIndex, words_of

MEASUREMENTS = ("pred", "occ")  # the columns of every score matrix: pred0, occ0, pred1, ...


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ = Pearson correlation of the ranks (ties broken by position)."""

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
        model: Any = rt.task.model  # a HF BertForSequenceClassification
        self.model = model
        self.layers = model.bert.encoder.layer
        self.last = len(self.layers) - 1
        self.prefix = f"bert.encoder.layer.{self.last}."
        self.rt = rt

    def _sub(self, params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}

    def logits(self, params: Mapping[str, Tensor], hidden: Tensor, mask: Tensor) -> Tensor:
        mask4 = self.rt.task.additive_mask(mask, hidden.dtype)
        out = functional_call(
            self.layers[self.last],
            self._sub(params, self.prefix),
            (hidden,),
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


def batch_plan(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's batches over ALL examples: a seeded permutation cut into chunks of 8 batches,
    each chunk sorted by length (little padding), then the batches shuffled. A retrain on a
    subset drops the left-out examples from these batches."""
    rng = random.Random(seed)
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    plan: list[list[int]] = []
    chunk = 8 * batch_size
    for c in range(0, len(perm), chunk):
        part = sorted(perm[c : c + chunk], key=lambda i: lengths[i])
        plan += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(plan)
    return plan


class Cache:
    """The bench's files under one directory: config.json (the retrain settings and queries the
    cache belongs to), inputs.pt (scope inputs), grads.pt (∇θf per query column), scores.pt
    (attribution name -> [N, 2Q]), solves.json, subsets.pt, retrains.json (key -> measured f)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def load_json(self, name: str, default: Any) -> Any:
        p = self.path(name)
        return json.loads(p.read_text()) if p.exists() else default

    def save_json(self, name: str, obj: Any) -> None:
        tmp = self.path(name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(self.path(name))

    def load_pt(self, name: str) -> Any:
        p = self.path(name)
        return torch.load(p, weights_only=False) if p.exists() else None

    def save_pt(self, name: str, obj: Any) -> None:
        tmp = self.path(name + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(self.path(name))


def solver_settings(rt: ModelRuntime, name: str) -> SolverSettings:
    """`diagonal@<scale>` = the diagonal Fisher with damping scale · mean(d); otherwise the
    SolverChoice named, with its default damping."""
    if name.startswith("diagonal@"):
        scale = float(name.split("@", 1)[1])
        return SolverSettings(
            method=SolverChoice.DIAGONAL, damping=scale * float(rt.diagonal().diag.mean())
        )
    return SolverSettings(method=SolverChoice(name))


# -- phase: prepare ---------------------------------------------------------------------------
def prepare(rt: ModelRuntime, sm: ScopeModel, cache: Cache, args: argparse.Namespace) -> bool:
    task, train = rt.task, rt.bundle.train
    n = rt.n_train
    if cache.load_pt("inputs.pt") is None:
        t0 = time.perf_counter()
        hidden: list[Tensor] = [torch.empty(0)] * n
        order = sorted(range(n), key=lambda i: len(train[i].text))
        for b in range(0, n, 64):
            idx = order[b : b + 64]
            enc = rt.encode_train(idx)
            h = sm.hidden(enc.embeds, enc.mask)
            for j, i in enumerate(idx):
                hidden[i] = h[j, : int(enc.mask[j].sum())].clone()
        log(f"cached scope inputs of {n} examples in {time.perf_counter() - t0:.0f} s")
        widx = WordIndex([ex.text for ex in train])
        queries, grads = [], []
        for text, gold in sample_sentences(args.queries * 2, args.seed, "test"):
            qenc = task.encode([text], max_length=rt.max_length)
            e = task.embed(qenc.input_ids).detach()
            with torch.no_grad():
                y = int(task.logits_fn(rt.params, e, qenc.attention_mask).argmax())
            wid, words = qenc.word_ids[0], qenc.words[0]
            c = word_occlusion(
                task.logits_fn, rt.params, e, qenc.attention_mask, y, wid, len(words), rt.unk_embed
            )
            cand = [i for i in range(len(words)) if words_of(words[i]) and i in wid]
            if not cand:
                continue
            w = max(cand, key=lambda i: float(c[i]))
            pos = [t for t, k in enumerate(wid) if k == w]
            e_occ = occlude(e, pos, rt.unk_embed)
            h2 = sm.hidden(torch.cat([e, e_occ]), qenc.attention_mask.expand(2, -1))
            # sanity: the scope model reproduces the served logits
            torch.testing.assert_close(
                sm.logits(rt.params, h2[:1], qenc.attention_mask),
                task.logits_fn(rt.params, e, qenc.attention_mask),
                atol=1e-4,
                rtol=1e-4,
            )
            queries.append(
                {
                    "text": text,
                    "gold": gold,
                    "pred": y,
                    "word": words[w],
                    "h": h2,
                    "mask": qenc.attention_mask.expand(2, -1).clone(),
                    "containing": widx.containing(words[w]),
                }
            )
            grads.append(grad_theta_margin(task.logits_fn, rt.params, e, qenc.attention_mask, y))
            grads.append(
                grad_theta_occlusion(
                    task.logits_fn, rt.params, e, qenc.attention_mask, y, pos, rt.unk_embed
                )
            )
            if len(queries) == args.queries:
                break
        labels = torch.tensor([ex.label for ex in train])
        cache.save_pt("grads.pt", torch.stack(grads, 1).float())  # [P, 2Q]
        cache.save_pt("inputs.pt", {"hidden": hidden, "labels": labels, "queries": queries})
    grads_all: Tensor = cache.load_pt("grads.pt")
    scores: dict[str, Tensor] = cache.load_pt("scores.pt") or {}
    solves: dict[str, Any] = cache.load_json("solves.json", {})
    # a pass in progress: its attributions, their s_test blocks, partial scores, rows done
    part: dict[str, Any] | None = cache.load_pt("pass.pt")
    if part is None:
        todo = [a for a in args.attributions.split(",") if a and a not in scores]
        if not todo:
            log(f"scores cached for {sorted(scores)}")
            return True
        blocks = []
        for name in todo:
            settings = solver_settings(rt, name)
            cols, t0 = [], time.perf_counter()
            diag: dict[str, Any] = {}
            for j in range(grads_all.shape[1]):
                x, diag = solve_s_test(
                    rt, grads_all[:, j].to(rt.task.dtype), settings, lambda: None
                )
                cols.append(x.float())
            solves[name] = {k: diag.get(k) for k in ("effective_damping", "damping_rule")}
            solves[name]["seconds_per_solve"] = (time.perf_counter() - t0) / grads_all.shape[1]
            log(f"solved {name}: {solves[name]}")
            blocks.append(torch.stack(cols, 1))
        cache.save_json("solves.json", solves)
        cache.save_pt("blocks.pt", blocks)
        part = {
            "names": todo,
            "scores": [torch.zeros(n, grads_all.shape[1]) for _ in todo],
            "done": torch.zeros(n, dtype=torch.bool),
        }
        cache.save_pt("pass.pt", part)
    else:
        blocks = cache.load_pt("blocks.pt")
    del grads_all
    scope = (sm.logits, cache.load_pt("inputs.pt")["hidden"])
    checked = False
    # the exact pass in parts of 640 examples, saved after each (resumable)
    while not bool(part["done"].all()):
        if out_of_time(args):
            log(f"time budget spent in the training pass ({int(part['done'].sum())}/{n} rows)")
            return False
        rows = (~part["done"]).nonzero().flatten()[:640].tolist()
        t0 = time.perf_counter()
        # the gradients from the cached scope inputs (no frozen layers), checked once per
        # run against the full model on a few rows
        outs, _ = training_pass(rt, blocks, 32, False, indices=rows, scope_inputs=scope)
        if not checked:
            ref, _ = training_pass(rt, blocks, 32, False, indices=rows[:4])
            for got, want in zip(outs, ref):
                tol = 1e-4 * float(want[rows[:4]].abs().max())
                torch.testing.assert_close(got[rows[:4]], want[rows[:4]], rtol=1e-3, atol=tol)
            checked = True
        for acc, out in zip(part["scores"], outs):
            acc[rows] = out[rows]
        part["done"][rows] = True
        cache.save_pt("pass.pt", part)
        log(f"training pass: {int(part['done'].sum())}/{n} rows ({time.perf_counter() - t0:.0f} s)")
    scores.update(zip(part["names"], part["scores"]))
    cache.save_pt("scores.pt", scores)
    cache.path("pass.pt").unlink()
    cache.path("blocks.pt").unlink()
    log(f"scores cached for {sorted(scores)}")
    return True


T_START = time.perf_counter()


def out_of_time(args: argparse.Namespace) -> bool:
    """Whether --budget-min minutes have passed since the bench started."""
    return time.perf_counter() - T_START > 60 * args.budget_min


# -- retraining -------------------------------------------------------------------------------
class Retrainer:
    """Adam from θ* on a subset of the training set (the batch plan of `batch_plan`), measuring
    every query's (m_y, c_w) afterwards. Results are stored in retrains.json under a key."""

    def __init__(
        self, rt: ModelRuntime, sm: ScopeModel, cache: Cache, args: argparse.Namespace
    ) -> None:
        inputs = cache.load_pt("inputs.pt")
        self.hidden: list[Tensor] = inputs["hidden"]
        self.labels: Tensor = inputs["labels"]
        self.queries = inputs["queries"]
        self.sm, self.cache, self.args = sm, cache, args
        self.theta0 = {k: v.detach().clone() for k, v in rt.params.items()}
        self.n = len(self.hidden)
        lengths = [int(h.shape[0]) for h in self.hidden]
        self.plans = [
            batch_plan(lengths, args.batch_size, 1000 * args.retrain_seed + ep)
            for ep in range(args.epochs)
        ]
        self.done: dict[str, Any] = cache.load_json("retrains.json", {})

    def measure(self, params: Mapping[str, Tensor]) -> list[list[float]]:
        out = []
        with torch.no_grad():
            for q in self.queries:
                m = margin(self.sm.logits(params, q["h"], q["mask"]), torch.tensor([q["pred"]] * 2))
                out.append([float(m[0]), float(m[0] - m[1])])
        return out

    def run(self, key: str, drop: Sequence[int]) -> bool:
        """Retrain without the examples `drop` and store the measurements under `key` (skipped
        when cached). False when the time budget is spent (nothing started)."""
        if key in self.done:
            return True
        if out_of_time(self.args):
            return False
        t0 = time.perf_counter()
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[list(drop)] = False
        n_keep = int(keep.sum())
        theta = {k: v.clone().requires_grad_(True) for k, v in self.theta0.items()}
        opt = torch.optim.Adam(theta.values(), lr=self.args.lr)
        prox = self.args.prox
        for plan in self.plans:
            for batch in plan:
                idx = [i for i in batch if keep[i]]
                if not idx:
                    continue
                h, m = pad([self.hidden[i] for i in idx])
                loss = F.cross_entropy(self.sm.logits(theta, h, m), self.labels[idx])
                loss = (
                    loss
                    + 0.5
                    * prox
                    * sum(((theta[k] - self.theta0[k]) ** 2).sum() for k in theta)
                    / n_keep
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.done[key] = {
            "f": self.measure({k: v.detach() for k, v in theta.items()}),
            "removed": len(drop),
            "seconds": time.perf_counter() - t0,
        }
        self.cache.save_json("retrains.json", self.done)
        log(f"retrain {key} ({len(self.done)} cached) in {time.perf_counter() - t0:.0f} s")
        return True


def subsets(cache: Cache, n: int, count: int, seed: int) -> Tensor:
    """[count, N] bool masks of random 50 % subsets, drawn once and cached."""
    masks: Tensor | None = cache.load_pt("subsets.pt")
    if masks is None or masks.shape[0] < count:
        rng = random.Random(seed)
        masks = torch.zeros(count, n, dtype=torch.bool)
        for k in range(count):
            masks[k, rng.sample(range(n), n // 2)] = True
        cache.save_pt("subsets.pt", masks)
    return masks[:count]


def lds_phase(rtr: Retrainer, args: argparse.Namespace) -> bool:
    masks = subsets(rtr.cache, rtr.n, args.subsets, args.seed)
    for k in range(masks.shape[0]):
        drop = (~masks[k]).nonzero().flatten().tolist()
        if not rtr.run(f"lds/{k}", drop):
            log("time budget spent: rerun to continue the LDS retrains")
            return False
    return True


def removal_sets(cache: Cache, n: int, args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """(key, removed indices) in priority order: the full set, the random 1 % removals, then
    the top 1 % supporters per attribution × measurement × query."""
    k_rm = max(1, n // 100)
    out: list[tuple[str, list[int]]] = [("base", [])]
    for r in range(args.random_removals):
        out.append((f"random/{r}", random.Random(100 + r).sample(range(n), k_rm)))
    scores: dict[str, Tensor] = cache.load_pt("scores.pt")
    rq = min(args.removal_queries, scores[next(iter(scores))].shape[1] // 2)
    for mi, meas in enumerate(MEASUREMENTS):
        if meas not in args.removal_measurements.split(","):
            continue
        for attr in args.removal_attributions.split(","):
            if attr not in scores:
                log(f"removal: {attr} has no cached scores (add it with --phase prepare)")
                continue
            for qi in range(rq):
                col = scores[attr][:, 2 * qi + mi]
                top = torch.argsort(col, descending=True)[:k_rm].tolist()
                out.append((f"top/{attr}/{meas}/{qi}", top))
    return out


def removal_phase(rtr: Retrainer, args: argparse.Namespace, first: int | None = None) -> bool:
    """The removal retrains in priority order (only the first `first` when given)."""
    for key, drop in removal_sets(rtr.cache, rtr.n, args)[:first]:
        if not rtr.run(key, drop):
            log("time budget spent: rerun to continue the removal retrains")
            return False
    return True


# -- phase: report ----------------------------------------------------------------------------
def mean_se(xs: Sequence[float]) -> dict[str, float]:
    vals = [x for x in xs if not math.isnan(x)]
    m = statistics.fmean(vals) if vals else float("nan")
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    return {"mean": round(m, 4), "se": round(se, 4), "n": len(vals)}


def report(cache: Cache, args: argparse.Namespace) -> dict[str, Any]:
    inputs = cache.load_pt("inputs.pt")
    queries = inputs["queries"]
    n = len(inputs["hidden"])
    scores: dict[str, Tensor] = cache.load_pt("scores.pt")
    done: dict[str, Any] = cache.load_json("retrains.json", {})
    config = cache.load_json("config.json", {})
    masks = cache.load_pt("subsets.pt")
    lds_keys = sorted((k for k in done if k.startswith("lds/")), key=lambda k: int(k[4:]))
    lds: dict[str, Any] = {}
    if len(lds_keys) >= 3:
        idx = [int(k[4:]) for k in lds_keys]
        sub = masks[idx].float()  # [S, N]
        for attr, sc in scores.items():
            for meas in ("pred", "occ", "pred_w"):
                mi = 1 if meas == "occ" else 0
                per_q = []
                for qi, q in enumerate(queries):
                    col = sc[:, 2 * qi + mi].clone()
                    if meas == "pred_w":
                        only = torch.zeros(n)
                        only[q["containing"]] = 1.0
                        col = col * only
                    pred = (sub @ col).tolist()
                    per_q.append(spearman(pred, [done[k]["f"][qi][mi] for k in lds_keys]))
                lds[f"{meas}/{attr}"] = {
                    **mean_se(per_q),
                    "per_query": [round(v, 4) for v in per_q],
                }
    removal: dict[str, Any] = {}
    if "base" in done:
        base = done["base"]["f"]
        rnd = [done[k]["f"] for k in done if k.startswith("random/")]
        groups: dict[str, dict[int, float]] = {}
        for key in done:
            if key.startswith("top/"):
                _, attr, meas, qi_s = key.split("/")
                qi, mi = int(qi_s), MEASUREMENTS.index(meas)
                groups.setdefault(f"{meas}/{attr}", {})[qi] = done[key]["f"][qi][mi] - base[qi][mi]
        for name, by_q in sorted(groups.items()):
            mi = MEASUREMENTS.index(name.split("/")[0])
            qs = sorted(by_q)
            deltas = [by_q[q] for q in qs]
            rnd_mean = [
                statistics.fmean(r[q][mi] - base[q][mi] for r in rnd) if rnd else float("nan")
                for q in qs
            ]
            removal[name] = {
                "queries": len(qs),
                "fraction_lowered": round(sum(d < 0 for d in deltas) / len(deltas), 3),
                "fraction_below_random": (
                    round(sum(d < r for d, r in zip(deltas, rnd_mean)) / len(deltas), 3)
                    if rnd
                    else None
                ),
                "mean_change": round(statistics.fmean(deltas), 6),
                "random_mean_change": round(statistics.fmean(rnd_mean), 6) if rnd else None,
                "per_query": {str(q): round(d, 6) for q, d in zip(qs, deltas)},
                "random_per_query": {str(q): round(r, 6) for q, r in zip(qs, rnd_mean)},
            }
        if rnd:
            for mi, meas in enumerate(MEASUREMENTS):
                ch = [r[q][mi] - base[q][mi] for r in rnd for q in range(len(queries))]
                removal[f"random_spread/{meas}"] = {
                    "retrains": len(rnd),
                    "mean": round(statistics.fmean(ch), 6),
                    "sd": round(statistics.stdev(ch), 6) if len(ch) > 1 else None,
                }
    secs = [v["seconds"] for v in done.values()]
    return {
        "bundle": config.get("bundle"),
        "queries": [
            {
                "text": q["text"],
                "gold": q["gold"],
                "pred": q["pred"],
                "word": q["word"],
                "containing": len(q["containing"]),
            }
            for q in queries
        ],
        "retrain": {
            **config.get("retrain", {}),
            "optimizer": "adam",
            "what": "scope (last encoder layer + pooler + classifier) from the served "
            "model, cached inputs of the scope, fixed batch plan",
        },
        "subsets": len(lds_keys),
        "removed_per_query": max(1, n // 100),
        "random_removals": sum(1 for k in done if k.startswith("random/")),
        "solves": cache.load_json("solves.json", {}),
        "lds": lds,
        "removal": removal,
        "seconds": {
            "retrains": round(sum(secs)),
            "per_retrain_mean": (round(statistics.fmean(secs), 1) if secs else None),
        },
        "cache": str(cache.root),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="bundles/minilm-sst2")
    ap.add_argument(
        "--phase", default="all", choices=["prepare", "lds", "removal", "report", "all"]
    )
    ap.add_argument(
        "--cache",
        default=None,
        help="cache directory (default /var/tmp/pairdots-faithfulness/<bundle>)",
    )
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--subsets", type=int, default=30)
    ap.add_argument("--removal-queries", type=int, default=10)
    ap.add_argument("--random-removals", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1, help="queries and subsets")
    ap.add_argument("--retrain-seed", type=int, default=0, help="the batch plan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--budget-min",
        type=float,
        default=18.0,
        help="start no retrain after this many minutes (rerun to resume)",
    )
    ap.add_argument("--name", default="faithfulness")
    ap.add_argument(
        "--attributions",
        default="identity,low_rank,diagonal,ekfac,diagonal@0.001,diagonal@0.01,"
        "diagonal@1,diagonal@10",
        help="solvers (SolverChoice values, or diagonal@<damping scale>) scored",
    )
    ap.add_argument(
        "--removal-attributions",
        default="diagonal,identity,low_rank",
        help="in priority order (the removal retrains go measurement by measurement)",
    )
    ap.add_argument("--removal-measurements", default="pred,occ")
    ap.add_argument(
        "--prox",
        type=float,
        default=0.05,
        help="λ of the proximal term (λ/2)‖θ − θ*‖² of the retrain objective",
    )
    args = ap.parse_args()

    root = Path(args.cache or f"/var/tmp/pairdots-faithfulness/{Path(args.bundle).name}")
    cache = Cache(root)
    config = {
        "bundle": args.bundle,
        "queries": args.queries,
        "seed": args.seed,
        "retrain": {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "proximal_lambda": args.prox,
            "retrain_seed": args.retrain_seed,
        },
    }
    old = cache.load_json("config.json", None)
    if old is not None and old != config:
        raise SystemExit(f"{root} holds results of {old}; use another --cache for {config}")
    cache.save_json("config.json", config)

    if args.phase != "report":
        rt, _ = load_runtime(args.bundle, args.threads)
        sm = ScopeModel(rt)
        ready = cache.load_pt("scores.pt") is not None
        if args.phase in ("prepare", "all"):
            ready = prepare(rt, sm, cache, args)
        if ready and args.phase in ("lds", "removal", "all"):
            rtr = Retrainer(rt, sm, cache, args)
            finished = True
            if args.phase == "all":  # the default's prediction-level removal test first
                rq = min(args.removal_queries, args.queries)
                finished = removal_phase(rtr, args, first=1 + args.random_removals + rq)
            if finished and args.phase in ("lds", "all"):
                finished = lds_phase(rtr, args)
            if finished and args.phase in ("removal", "all"):
                removal_phase(rtr, args)
    if cache.load_pt("scores.pt") is None:
        log("no scores cached yet: rerun --phase prepare")
        return
    result = report(cache, args)
    for name, v in result["lds"].items():
        log(f"LDS {name}: {v['mean']:.3f} ± {v['se']:.3f} ({v['n']} queries)")
    for name, v in result["removal"].items():
        log(
            f"removal {name}: {v}"
            if name.startswith("random_spread")
            else f"removal {name}: lowered in {v['fraction_lowered']:.2f} of {v['queries']}, below "
            f"random in {v['fraction_below_random']}, mean {v['mean_change']:+.4f} (random "
            f"{v['random_mean_change']})"
        )
    path = write_result(args.name, result)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
