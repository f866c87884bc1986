"""Which word scores say which words the model uses? AOPC / comprehensiveness on SST-2.

For each test sentence and each word score, remove the top-k words (replace their word pieces
by [UNK], k = 1..K) in the order of the score and measure the drop of the margin
m_y = z_y − max_{c≠y} z_c of the predicted label y (ERASER comprehensiveness; AOPC = the
mean drop over k = 1..K, DeYoung et al. 2020). Higher = the score finds the words the
prediction rests on. Sufficiency: the drop when ONLY the top-k words are kept (the rest →
[UNK]); lower = better.

Scores (per word = sum over its pieces):
  l2_logp        ‖∇_e log p_y‖ (the first wave's default token score; unsigned)
  grad_input     ∇_e m_y · e
  grad_delta_unk ∇_e m_y · (e − e_[UNK])
  occlusion      c_w = m_y(x) − m_y(x with w → [UNK])  (the service's default word ranking)
  integrated_gradients  Captum IntegratedGradients of m_y on the word embeddings from the
                 [UNK] baseline (32 steps), summed over the embedding dimension
  random         a seeded random order (the floor)

  python3 bench/token_faithfulness.py --bundle bundles/minilm-sst2 --n 100
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import load_runtime, log, sample_sentences
from _results import write_result
from captum.attr import IntegratedGradients
from torch import Tensor

from pairdots_server.core.measure import margin, word_occlusion
from pairdots_server.core.saliency import Target, TokenScore, token_saliency, word_scores
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.wordmatch import words_of

METHODS = ("l2_logp", "grad_input", "grad_delta_unk", "occlusion", "integrated_gradients",
           "random")


def one_sentence(
    rt: ModelRuntime, text: str, args: argparse.Namespace, rng: random.Random,
    aopc: dict[str, list[float]], suff: dict[str, list[float]], seconds: dict[str, float],
) -> None:
    """Score the words of one sentence every way and record its AOPC figures."""
    task, params, unk = rt.task, rt.params, rt.unk_embed
    enc = task.encode([text], max_length=rt.max_length)
    e = task.embed(enc.input_ids).detach()  # [1,T,D]
    mask = enc.attention_mask
    wid, words = enc.word_ids[0], enc.words[0]
    n_words = len(words)
    cand = [i for i in range(n_words) if words_of(words[i]) and i in wid]
    if len(cand) < 2:
        return
    with torch.no_grad():
        logits = task.logits_fn(params, e, mask)
    y = int(logits.argmax())
    yt = torch.tensor([y])

    def m_of(batch: Tensor) -> Tensor:
        with torch.no_grad():
            return margin(task.logits_fn(params, batch, mask.expand(batch.shape[0], -1)),
                          yt.expand(batch.shape[0]))

    base = float(m_of(e)[0])

    def grad_margin() -> Tensor:
        x = e.clone().requires_grad_(True)
        with torch.enable_grad():
            mm = margin(task.logits_fn(params, x, mask), yt).sum()
            (g,) = torch.autograd.grad(mm, x)
        return g[0]  # [T,D]

    def per_word(tok: Tensor) -> list[float]:
        return [float(v) for v in word_scores(tok, wid, n_words)]

    scores: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    scores["l2_logp"] = per_word(token_saliency(
        task.logits_fn, params, e, mask, y, Target.LOG_PROB, TokenScore.L2_NORM, baseline=unk))
    seconds["l2_logp"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    g = grad_margin()
    scores["grad_input"] = per_word((g * e[0]).sum(-1))
    seconds["grad_input"] += time.perf_counter() - t0
    scores["grad_delta_unk"] = per_word((g * (e[0] - unk)).sum(-1))
    t0 = time.perf_counter()
    scores["occlusion"] = [float(v) for v in word_occlusion(
        task.logits_fn, params, e, mask, y, wid, n_words, unk)]
    seconds["occlusion"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = IntegratedGradients(lambda x: margin(
        task.logits_fn(params, x, mask.expand(x.shape[0], -1)), yt.expand(x.shape[0])))
    baseline = unk.expand_as(e).clone()
    with torch.enable_grad():
        attr = ig.attribute(e, baselines=baseline, n_steps=args.ig_steps,
                            internal_batch_size=args.ig_steps)
    scores["integrated_gradients"] = per_word(attr[0].sum(-1).detach())
    seconds["integrated_gradients"] += time.perf_counter() - t0
    order_r = cand[:]
    rng.shuffle(order_r)
    scores["random"] = [0.0] * n_words
    for rank, i in enumerate(order_r):
        scores["random"][i] = float(len(order_r) - rank)

    k_max = min(args.k, len(cand))
    for name, sc in scores.items():
        order = sorted(cand, key=lambda i: -sc[i])
        removed, kept = [], []
        for k in range(1, k_max + 1):
            top = set(order[:k])
            r = e.clone()
            s_ = e.clone()
            for t, w in enumerate(wid):
                if w is None:
                    continue
                if w in top:
                    r[0, t] = unk
                else:
                    s_[0, t] = unk
            removed.append(r)
            kept.append(s_)
        drops = base - m_of(torch.cat(removed))
        drops_kept = base - m_of(torch.cat(kept))
        aopc[name].append(float(drops.mean()))
        suff[name].append(float(drops_kept.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default="bundles/minilm-sst2")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ig-steps", type=int, default=32)
    args = ap.parse_args()
    rt, _ = load_runtime(args.bundle, args.threads)

    aopc: dict[str, list[float]] = {m: [] for m in METHODS}
    suff: dict[str, list[float]] = {m: [] for m in METHODS}
    seconds: dict[str, float] = {m: 0.0 for m in METHODS}
    rng = random.Random(args.seed)
    for text, _gold in sample_sentences(args.n, args.seed, "test"):
        one_sentence(rt, text, args, rng, aopc, suff, seconds)
    res = {
        m: {"aopc_comprehensiveness": statistics.fmean(aopc[m]),
            "aopc_sufficiency": statistics.fmean(suff[m]), "seconds": seconds[m]}
        for m in METHODS
    }
    for m, r in res.items():
        log(f"{m:22s} comprehensiveness {r['aopc_comprehensiveness']:+.3f}  "
            f"sufficiency {r['aopc_sufficiency']:+.3f}")
    path = write_result("token_faithfulness", {
        "bundle": args.bundle, "sentences": len(aopc["random"]), "k": args.k,
        "ig_steps": args.ig_steps, "measure": "margin of the predicted label", "results": res,
    })
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
