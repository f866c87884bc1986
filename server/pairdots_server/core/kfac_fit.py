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
off); pass 2 (EK-FAC only) accumulates Λ = Σ_n (Q_Sᵀ G_n Q_A)² with G_n = Σ_t δ_t a_tᵀ,
computed as Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ (rotate per token, then contract: no [O, I] rotation per
example).
The sampled labels are drawn from a generator reset to ``seed`` at the start of each pass, so
both passes see the same labels. The hooks and the recorded pass are in ``core.kfac_capture``,
the Fisher label terms in ``core.fisher_terms``; this module runs the two passes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pairdots_server.core.aliases import LogitsFn, ShouldStop
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.fisher_terms import (  # noqa: F401 (re-exported)
    BatchLike,
    as_triple,
    check_fisher,
    fisher_label_terms,
    reiterable,
    squared_grad_sum,
)
from pairdots_server.core.grads import VmapMask
from pairdots_server.core.ihvp.kfac import KFACFactors, LinearFactors
from pairdots_server.core.kfac_capture import (
    LinearCapture,
    masked_tokens,
    output_deltas,
    recorded_forward,
    scoped_linears,
    with_bias_column,
)

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
    Products (aᵀa, δᵀδ, the rotated per-example gradients) are computed in the params' dtype
    and summed in ``accum_dtype`` (float64); eigendecomposes in float64, stores the factors in
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

    capture = LinearCapture(linears)
    try:
        # ---- pass 1: A, S, diagonal of the other parameters --------------------------------
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        for batch in get_batches():
            if should_stop is not None:
                should_stop()
            embeds, mask, labels = as_triple(batch)
            logits, terms = recorded_forward(
                capture, params, logits_fn, embeds, mask, labels, fisher, gen, num_samples
            )
            records = capture.records
            capture.records = []
            for name, a_raw, _ in records:
                a, m = masked_tokens(a_raw, mask)
                a = with_bias_column(a, m, has_bias[name]).reshape(-1, a_sum[name].shape[0])
                a_sum[name] += (a.T @ a).to(accum_dtype)  # product in compute dtype, sum in accum
                tokens[name] += float(m.sum())
            for y, w in terms:
                deltas = output_deltas(logits, y, w, records)
                for (name, _, _), delta in zip(records, deltas, strict=True):
                    if delta is None:
                        continue
                    d, _ = masked_tokens(delta, mask)
                    d = d.reshape(-1, d.shape[-1])
                    s_sum[name] += (d.T @ d).to(accum_dtype)
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
            bases = {n: (eig[n][0].to(first.dtype), eig[n][2].to(first.dtype)) for n in linears}
            for batch in get_batches():
                if should_stop is not None:
                    should_stop()
                embeds, mask, labels = as_triple(batch)
                logits, terms = recorded_forward(
                    capture, params, logits_fn, embeds, mask, labels, fisher, gen, num_samples
                )
                records = capture.records
                capture.records = []
                acts = []
                for name, a_raw, _ in records:
                    a, m = masked_tokens(a_raw, mask)
                    acts.append(with_bias_column(a, m, has_bias[name]))  # [B,T,I']
                for y, w in terms:
                    deltas = output_deltas(logits, y, w, records)
                    # Q_Sᵀ G_n Q_A = Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ: rotate each token's δ and a,
                    # then contract over tokens (T·(O² + I'²) + T·O·I' flops per example,
                    # instead of O²·I' + O·I'² for rotating G_n itself)
                    g_n: dict[str, Tensor] = {}
                    for (name, _, _), a, delta in zip(records, acts, deltas, strict=True):
                        if delta is None:
                            continue
                        qa, qs = bases[name]
                        d, _ = masked_tokens(delta, mask)
                        rot = torch.einsum("bto,bti->boi", d @ qs, a @ qa)  # Q_Sᵀ G_n Q_A [B,O,I']
                        g_n[name] = g_n[name] + rot if name in g_n else rot
                    for name, rot in g_n.items():
                        lam_sum[name] += rot.square().sum(0).to(accum_dtype)
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
