"""Fitting K-FAC / EK-FAC factors (``core.ihvp.kfac``) and the Fisher label terms they share
with the diagonal solver.

Which Fisher (``fisher=``), for L = -log p(y|x) with softmax p:

* ``"sampled"`` (default; kronfluence's, Grosse et al. 2023): the true Fisher, estimated with
  ``num_samples`` labels y ~ p(·|x) drawn per example (weights 1/num_samples). For softmax
  cross-entropy E_y[∇L ∇Lᵀ] equals the Gauss–Newton matrix J_ᵀ (diag p - ppᵀ) J of
  ``core.curvature`` (Curvature.GGN).
* ``"expected"``: the same true Fisher computed exactly, Σ_c p_c ∇L(c) ∇L(c)ᵀ: one backward pass
  per class, weight p_c (no sampling noise; cheap for the few classes of a text classifier).
* ``"empirical"``: the empirical Fisher with the gold labels (weight 1).

Every kind is a list of (labels y_k [B], weights w_k [B]) terms, and a statistic is
Σ_k Σ_n w_kn · f(∇L_n(y_kn)). Second moments get the weight by back-propagating
Σ_n sqrt(w_kn) L_n(y_kn), which scales each example's δ by sqrt(w_kn).

``fit_kfac`` (see the formulas in ``core.ihvp.kfac``): forward hooks on the scoped
``nn.Linear`` modules record the layer input a [B,T,I] and output y [B,T,O] of every call (they
fire under ``torch.func.functional_call``); δ = ∂(Σ_n sqrt(w_n) L_n)/∂y comes from
``torch.autograd.grad`` w.r.t. those recorded outputs. Padded tokens (attention mask 0) are
zeroed in a and δ and not counted, so they contribute nothing. Inputs that are [B,I] (pooler,
classifier) count as one token per example. Pass 1 accumulates A, S and the diagonal of the
other parameters (per-example gradients from ``core.grads.per_example_loss_grads``, hooks
off); pass 2 (EK-FAC only) accumulates Λ = Σ_n (Q_Sᵀ G_n Q_A)² with G_n = Σ_t δ_t a_tᵀ.
The sampled labels are drawn from a generator reset to ``seed`` at the start of each pass, so
both passes see the same labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairdots_server.core.aliases import LogitsFn, ShouldStop
from pairdots_server.core.batches import Batch
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.grads import VmapMask, per_example_loss_grads
from pairdots_server.core.ihvp.kfac import FISHER_KINDS, KFACFactors, LinearFactors

BatchLike = Any  # a core.batches.Batch or an (embeds [B,T,D], mask [B,T], labels [B]) tuple


# --------------------------------------------------------------------------------------------
# Fisher label terms (shared with core.ihvp.diagonal)
# --------------------------------------------------------------------------------------------


def check_fisher(fisher: str, num_samples: int) -> None:
    if fisher not in FISHER_KINDS:
        raise SolverError(f"unknown fisher {fisher!r}; use one of {', '.join(FISHER_KINDS)}")
    if num_samples < 1:
        raise SolverError(f"num_samples must be >= 1, got {num_samples}")


def fisher_label_terms(
    logits: Tensor,
    labels: Tensor,
    fisher: str,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> list[tuple[Tensor, Tensor]]:
    """The (labels [B], weights [B]) terms of the chosen Fisher for logits [B,C], gold labels [B].

    sampled: ``num_samples`` draws y ~ softmax(logits) (CPU generator), weight 1/num_samples;
    expected: y = c for every class c, weight p_c; empirical: the gold labels, weight 1.
    """
    check_fisher(fisher, num_samples)
    b, c = logits.shape
    dtype = logits.dtype
    if fisher == "empirical":
        return [(labels.long(), torch.ones(b, dtype=dtype, device=logits.device))]
    prob = torch.softmax(logits.detach(), dim=-1)  # [B,C]
    if fisher == "expected":
        return [
            (torch.full((b,), k, dtype=torch.long, device=logits.device), prob[:, k])
            for k in range(c)
        ]
    draws = torch.multinomial(
        prob.detach().to("cpu", torch.float64), num_samples, replacement=True, generator=generator
    ).to(logits.device)  # [B,k]
    w = torch.full((b,), 1.0 / num_samples, dtype=dtype, device=logits.device)
    return [(draws[:, j], w) for j in range(num_samples)]


def squared_grad_sum(
    logits_fn: LogitsFn,
    params: Mapping[str, Tensor],
    embeds: Tensor,
    mask: Tensor,
    terms: list[tuple[Tensor, Tensor]],
    chunk_size: int | None = None,
    vmap_mask: VmapMask = VmapMask.ADDITIVE_4D,
) -> Tensor:
    """Σ_k Σ_n w_kn · (∇θ L_n(y_kn))² [P] (elementwise), per-example gradients by vmap."""
    total = None
    for y, w in terms:
        g = per_example_loss_grads(
            logits_fn, params, embeds, mask, y, chunk_size=chunk_size, vmap_mask=vmap_mask
        )  # [B,P]
        part = (w.to(g.dtype)[:, None] * g.square()).sum(0)
        total = part if total is None else total + part
    assert total is not None
    return total


def as_triple(batch: BatchLike) -> tuple[Tensor, Tensor, Tensor]:
    """A Batch or an (embeds, mask, labels) tuple -> (embeds [B,T,D], mask [B,T], labels [B])."""
    if isinstance(batch, Batch):
        return batch.embeds, batch.mask, batch.labels
    embeds, mask, labels = batch
    return embeds, mask, labels


def reiterable(batches: Any) -> Callable[[], Iterator[BatchLike]]:
    """A function returning a fresh iterator over the batches each call (the fit makes two
    passes): a BatchProvider (its ``full()``), or a re-iterable collection (list, tuple)."""
    if hasattr(batches, "full"):
        return lambda: iter(batches.full())
    if iter(batches) is batches:
        raise SolverError(
            "the K-FAC fit makes two passes over the data; pass a list of batches or a "
            "BatchProvider (e.g. core.batches.TensorBatches), not a one-shot iterator"
        )
    return lambda: iter(batches)


# --------------------------------------------------------------------------------------------
# Capture of Linear inputs and outputs
# --------------------------------------------------------------------------------------------


class _LinearCapture:
    """Forward hooks recording (module name, input, output) of every call while ``active``."""

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        self.active = False
        self.records: list[tuple[str, Tensor, Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.active:
                self.records.append((name, inputs[0].detach(), output))

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _tokens(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """x [B,*,F] -> (x [B,T',F] with padded tokens zeroed, token mask [B,T',1]).

    [B,T,F] with [B,T] matching the attention mask: masked by it; [B,F]: one token; any other
    shape: the middle dims flattened into tokens, all kept.
    """
    b = x.shape[0]
    if x.dim() == 3 and x.shape[:2] == mask.shape:
        m = mask.to(x.dtype)[..., None]  # [B,T,1]
        return x * m, m
    x3 = x.reshape(b, -1, x.shape[-1])
    return x3, torch.ones(b, x3.shape[1], 1, dtype=x.dtype, device=x.device)


def _augment(a: Tensor, m: Tensor, bias: bool) -> Tensor:
    """a [B,T,I] (masked) -> [B,T,I+1] with the masked 1 of the bias appended (if ``bias``)."""
    return torch.cat([a, m], dim=-1) if bias else a


def scoped_linears(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, nn.Linear]:
    """module name -> nn.Linear for every Linear whose weight is in ``params``, in model order."""
    names = {n for n, _ in model.named_parameters()}
    unknown = [n for n in params if n not in names]
    if unknown:
        raise SolverError(
            f"scope parameters {unknown[:3]} are not parameters of {type(model).__name__}; "
            "pass the scope dict of this model (Task.scope_params())"
        )
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and f"{name}.weight" in params
    }


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def fit_kfac(
    model: nn.Module,
    params: Mapping[str, Tensor],
    logits_fn: LogitsFn,
    batches: Iterable[BatchLike],
    *,
    fisher: str = "sampled",
    num_samples: int = 1,
    eigen_correction: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
    vmap_mask: VmapMask = VmapMask.ADDITIVE_4D,
    accum_dtype: torch.dtype = torch.float64,
    factor_dtype: torch.dtype | None = None,
    should_stop: ShouldStop | None = None,
) -> KFACFactors:
    """Fit K-FAC (``eigen_correction=False``) or EK-FAC factors of the scope ``params``.

    model: the nn.Module whose Linear modules ``logits_fn`` runs (eval mode: no dropout);
    params: the scope dict (name -> tensor, names from ``model.named_parameters()``; its order is
    the flat-θ order); logits_fn(params, embeds [B,T,D], mask [B,T]) -> logits [B,C] (it is also
    called with a subset of ``params`` — the non-Linear ones — under vmap, as in core.grads);
    batches: a list of ``Batch`` / (embeds, mask, labels) tuples, or a BatchProvider.
    Accumulates in ``accum_dtype`` (float64), eigendecomposes in float64, stores the factors in
    ``factor_dtype`` (default: the params' dtype). Cost: pass 1 = one forward + (terms) backward
    passes per batch + per-example gradients of the non-Linear parameters; pass 2 (EK-FAC) the
    same without the per-example gradients.
    """
    check_fisher(fisher, num_samples)
    if not params:
        raise SolverError("fit_kfac: the scope is empty; select at least one parameter")
    get_batches = reiterable(batches)
    linears = scoped_linears(model, params)
    first = next(iter(params.values()))
    device = first.device
    out_dtype = factor_dtype or first.dtype
    has_bias = {n: f"{n}.bias" in params and linears[n].bias is not None for n in linears}
    in_blocks = {f"{n}.weight" for n in linears} | {f"{n}.bias" for n in linears if has_bias[n]}
    other = {k: v.detach() for k, v in params.items() if k not in in_blocks}
    stats: dict[str, float] = {}

    a_sum: dict[str, Tensor] = {}
    s_sum: dict[str, Tensor] = {}
    tokens: dict[str, float] = {n: 0.0 for n in linears}
    for n, mod in linears.items():
        i = mod.in_features + int(has_bias[n])
        a_sum[n] = torch.zeros(i, i, dtype=accum_dtype, device=device)
        s_sum[n] = torch.zeros(mod.out_features, mod.out_features, dtype=accum_dtype, device=device)
    d_sum = {k: torch.zeros(v.numel(), dtype=accum_dtype, device=device) for k, v in other.items()}
    num_examples = 0

    capture = _LinearCapture(linears)
    try:
        # ---- pass 1: A, S, diagonal of the other parameters --------------------------------
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        for batch in get_batches():
            if should_stop is not None:
                should_stop()
            embeds, mask, labels = as_triple(batch)
            logits, terms = _forward(
                capture, params, logits_fn, embeds, mask, labels, fisher, gen, num_samples
            )
            records = capture.records
            capture.records = []
            for name, a_raw, _ in records:
                a, m = _tokens(a_raw, mask)
                a = _augment(a, m, has_bias[name]).to(accum_dtype).reshape(-1, a_sum[name].shape[0])
                a_sum[name] += a.T @ a
                tokens[name] += float(m.sum())
            for y, w in terms:
                deltas = _deltas(logits, y, w, records)
                for (name, _, _), delta in zip(records, deltas, strict=True):
                    if delta is None:
                        continue
                    d, _ = _tokens(delta, mask)
                    d = d.to(accum_dtype).reshape(-1, d.shape[-1])
                    s_sum[name] += d.T @ d
            if other:
                sq = squared_grad_sum(logits_fn, other, embeds, mask, terms, chunk_size, vmap_mask)
                offset = 0
                for k, v in other.items():
                    d_sum[k] += sq[offset : offset + v.numel()].to(accum_dtype)
                    offset += v.numel()
            num_examples += int(labels.shape[0])
            del logits, records
        if num_examples == 0:
            raise SolverError("fit_kfac: the batches hold no examples; give it training data")
        stats["pass1_seconds"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        eig: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for n in linears:
            a_cov = a_sum[n] / max(tokens[n], 1.0)
            s_cov = s_sum[n] / num_examples
            ea, qa = torch.linalg.eigh(0.5 * (a_cov + a_cov.T).double())
            es, qs = torch.linalg.eigh(0.5 * (s_cov + s_cov.T).double())
            eig[n] = (
                qa.to(accum_dtype),
                ea.to(accum_dtype),
                qs.to(accum_dtype),
                es.to(accum_dtype),
            )
        stats["eigh_seconds"] = time.perf_counter() - t0

        # ---- pass 2: EK-FAC eigenvalues ------------------------------------------------------
        lam_sum: dict[str, Tensor] = {}
        if eigen_correction and linears:
            t0 = time.perf_counter()
            lam_sum = {
                n: torch.zeros(
                    linears[n].out_features, eig[n][0].shape[0], dtype=accum_dtype, device=device
                )
                for n in linears
            }
            gen = torch.Generator().manual_seed(seed)
            for batch in get_batches():
                if should_stop is not None:
                    should_stop()
                embeds, mask, labels = as_triple(batch)
                logits, terms = _forward(
                    capture, params, logits_fn, embeds, mask, labels, fisher, gen, num_samples
                )
                records = capture.records
                capture.records = []
                acts = []
                for name, a_raw, _ in records:
                    a, m = _tokens(a_raw, mask)
                    acts.append(_augment(a, m, has_bias[name]).to(accum_dtype))  # [B,T,I']
                for y, w in terms:
                    deltas = _deltas(logits, y, w, records)
                    g_n: dict[str, Tensor] = {}
                    for (name, _, _), a, delta in zip(records, acts, deltas, strict=True):
                        if delta is None:
                            continue
                        d, _ = _tokens(delta, mask)
                        g = torch.einsum("bto,bti->boi", d.to(accum_dtype), a)  # G_n [B,O,I']
                        g_n[name] = g_n[name] + g if name in g_n else g
                    for name, g in g_n.items():
                        qa, _, qs, _ = eig[name]
                        rot = qs.T @ g @ qa  # [B,O,I']
                        lam_sum[name] += rot.square().sum(0)
                del logits, records
            stats["pass2_seconds"] = time.perf_counter() - t0
    finally:
        capture.close()

    linear_factors = []
    for n in linears:
        qa, ea, qs, es = eig[n]
        lam = lam_sum[n] / num_examples if n in lam_sum else None
        linear_factors.append(
            LinearFactors(
                module=n,
                weight_name=f"{n}.weight",
                bias_name=f"{n}.bias" if has_bias[n] else None,
                q_a=qa.to(out_dtype).contiguous(),
                eig_a=ea.to(out_dtype),
                q_s=qs.to(out_dtype).contiguous(),
                eig_s=es.to(out_dtype),
                lam=None if lam is None else lam.to(out_dtype),
                num_tokens=int(tokens[n]),
            )
        )
    diag = {k: (d_sum[k] / num_examples).to(out_dtype).view(v.shape) for k, v in other.items()}
    stats["num_examples"] = float(num_examples)
    factors = KFACFactors(
        shapes={k: tuple(v.shape) for k, v in params.items()},
        linear=linear_factors,
        diag=diag,
        fisher=fisher,
        num_examples=num_examples,
        num_samples=num_samples,
        stats=stats,
    )
    stats["num_bytes"] = float(factors.num_bytes)
    return factors


def fit_ekfac(
    model: nn.Module,
    params: Mapping[str, Tensor],
    logits_fn: LogitsFn,
    batches: Iterable[BatchLike],
    **kwargs: Any,
) -> KFACFactors:
    """``fit_kfac(..., eigen_correction=True)``: factors for ``EKFACSolver``."""
    kwargs["eigen_correction"] = True
    return fit_kfac(model, params, logits_fn, batches, **kwargs)


def _forward(
    capture: _LinearCapture,
    params: Mapping[str, Tensor],
    logits_fn: LogitsFn,
    embeds: Tensor,
    mask: Tensor,
    labels: Tensor,
    fisher: str,
    gen: torch.Generator,
    num_samples: int,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One recorded forward pass: logits [B,C] (with graph) and the Fisher label terms."""
    if embeds.dim() != 3 or mask.shape != embeds.shape[:2] or labels.shape != embeds.shape[:1]:
        raise SolverError(
            f"expected embeds [B,T,D], mask [B,T], labels [B]; got {tuple(embeds.shape)}, "
            f"{tuple(mask.shape)}, {tuple(labels.shape)}"
        )
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    capture.records = []
    capture.active = True
    try:
        with torch.enable_grad():
            logits = logits_fn(theta, embeds.detach(), mask)  # [B,C]
    finally:
        capture.active = False
    terms = fisher_label_terms(logits, labels, fisher, gen, num_samples)
    return logits, terms


def _deltas(
    logits: Tensor, y: Tensor, w: Tensor, records: list[tuple[str, Tensor, Tensor]]
) -> list[Tensor | None]:
    """δ = ∂(Σ_n sqrt(w_n) L_n(y_n))/∂(recorded outputs), one per record (None: unused)."""
    outs = [out for _, _, out in records]
    if not outs:
        return []
    with torch.enable_grad():
        loss = (w.detach().sqrt() * F.cross_entropy(logits, y, reduction="none")).sum()
        grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]
