"""Scope-only retraining to convergence of the proximal Bregman response: the quantity a
damped influence function estimates, computed exactly.

A training set D' that differs from the served one D (N examples) by examples added (A) and
examples removed (R) — an attack replaces, R = the originals and A = their edited copies; a
repair appends, R = ∅ — moves the scope parameters of the served model θ_s to

    θ̂(D') = argmin_θ  J(θ),
    J(θ) = (1/N) Σ_{z ∈ D} KL(p_s(·|x) ‖ p_θ(·|x))
         + (1/N) [Σ_{z ∈ A} L(z; θ) − Σ_{z ∈ R} L(z; θ)]  +  (λ/2) ‖θ − θ_s‖²,

over θ_scope only, the layers below the scope frozen, in eval mode (no dropout); p_s is the
served model's prediction. The first sum is the Bregman divergence of the cross-entropy
around the served outputs (for softmax cross-entropy it is the KL divergence, whatever the
label), so J(θ_s) is stationary for D' = D: the n = 0 retrain *is* the served model. Its
Hessian at θ_s is the Gauss–Newton matrix G of the mean loss, so to first order

    θ̂ − θ_s = −(G + λI)⁻¹ (1/N) Σ_A∖R ±∇θ L(z),   Δf = ∇f^T (θ̂ − θ_s),

which is what Eq. 5's damped influence (the GGN s_test with damping λ) predicts: Bae et al.
(NeurIPS 2022, "If influence functions are the answer, then what is the question?") name θ̂
the proximal Bregman response function (PBRF) and show that influence functions estimate it,
not a retrain from scratch. It is therefore the ground truth of the attack's and the repair's
first-order claims without what a stochastic fine-tune adds (batch order, dropout masks, an
optimum it does not reach), and it is deterministic: two training sets' responses differ by
their examples only.

J is minimised full batch by L-BFGS with a strong-Wolfe line search from θ_s until
max |∇J| ≤ tolerance or max_iterations. With the scope split (model/scope_split.py) every
evaluation runs the scoped top only: h_L of the served training examples comes from the
runtime's scope-input cache, h_L of new texts from one trunk forward each (rounded to the
cache's storage dtype, so edited and unedited examples are stored alike).

Default λ: the damping of the bundle's low-rank solver, damping_ratio · λ_max of the GGN
(influence/solver_config.py): the damping of the s_test behind the predicted margin changes
that Attack and Repair report.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pairdots_server.core.scoring import Row, pad_rows, token_batches
from pairdots_server.errors import FailedPrecondition, InvalidArgument
from pairdots_server.influence.scope_inputs import DTYPES
from pairdots_server.model.scope_split import ScopeSplit
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainResult

if TYPE_CHECKING:
    from pairdots_server.influence.runtime import ModelRuntime
    from pairdots_server.storage.data import Example

ProgressFn = Callable[[int, int, float], None]  # (evaluation, max evaluations, J)
Batch = tuple[Tensor, Tensor, Tensor]  # hidden [B,t,D], mask [B,t], labels [B]


class TrainingBatches:
    """The served training set as padded batches of h_L, built from the runtime's scope-input
    cache on every pass instead of held padded (the cache already holds every row once; a
    padded float32 copy of a large set would not fit): chunks of indices sorted by length,
    at most `batch_tokens` padded tokens each."""

    def __init__(self, rt: ModelRuntime, batch_tokens: int) -> None:
        self.rt = rt
        train = rt.bundle.train
        cache = rt.scope_inputs()
        assert cache is not None
        lengths = [int(r.shape[0]) for r in cache.rows(range(len(train)))] \
            if len(cache) >= len(train) else [len(e.text) // 4 + 2 for e in train]
        order = sorted(range(len(train)), key=lambda i: (lengths[i], i))
        self.chunks = token_batches(order, lengths, len(train), batch_tokens)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Batch]:
        for chunk in self.chunks:
            yield pad_rows(self.rt.scope_rows(chunk))


FALLBACK_DAMPING = 1e-2  # λ when the bundle has no low-rank curvature (no λ_max to scale)


@dataclass(frozen=True)
class ConvergedConfig:
    """damping: λ of the proximal term (None = default_damping); tolerance: stop when
    max |∇J| ≤ tolerance · max |∇J(θ_s)| (relative: the start's gradient is the perturbation's
    own size, (1/N) Σ ±∇L); max_iterations: L-BFGS iterations at most; batch_tokens: padded
    tokens per scoped-top forward (memory, not the result); history: L-BFGS memory."""

    damping: float | None = None
    tolerance: float = 1e-3
    max_iterations: int = 100
    batch_tokens: int = 16384
    history: int = 20

    def __post_init__(self) -> None:
        if self.damping is not None and not (self.damping > 0 and math.isfinite(self.damping)):
            raise ValueError(f"damping must be a positive finite number, got {self.damping}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if self.max_iterations < 1 or self.batch_tokens < 1 or self.history < 1:
            raise ValueError("max_iterations, batch_tokens and history must be >= 1, got "
                             f"{self.max_iterations}, {self.batch_tokens}, {self.history}")


@dataclass(frozen=True)
class ConvergedResult:
    """What the minimisation did: L-BFGS iterations, function evaluations, J and max |∇J| at
    the returned point, max |∇J| at θ_s, evaluations whose J was not finite (the returned
    point is then the lowest finite J seen), whether the tolerance was reached, λ, the examples added and
    removed, and the seconds taken."""

    iterations: int
    evaluations: int
    objective: float
    grad_max: float
    grad_max_start: float
    non_finite: int
    converged: bool
    damping: float
    added: int
    removed: int
    seconds: float

    @property
    def diverged(self) -> bool:
        """The minimisation ended with a larger gradient than it started from (or none)."""
        return not self.converged and not self.grad_max <= self.grad_max_start

    def note(self) -> str:
        if self.diverged:
            state = ("DIVERGED: max |∇J| grew, so J has no minimum near the served model for "
                     "this training set (the −L terms of many removed examples dominate the "
                     "proximal term); the evaluation after it is not meaningful: apply fewer "
                     "edits. It stopped")
        elif self.converged:
            state = "converged"
        else:
            state = "stopped before the tolerance" + (
                f" ({self.non_finite} evaluations overflowed; the lowest finite J is kept)"
                if self.non_finite else "")
        return (f"scope retrained to the proximal Bregman response (λ = {self.damping:.4g}, "
                f"{self.added} examples added, {self.removed} removed): {state} after "
                f"{self.iterations} L-BFGS iterations, max |∇J| {self.grad_max_start:.1e} → "
                f"{self.grad_max:.1e}")


def default_damping(rt: ModelRuntime) -> float:
    """λ of the bundle's low-rank solver: damping_ratio · λ_max (solver_config), else
    FALLBACK_DAMPING when the bundle has no low-rank curvature."""
    from pairdots_server.influence.solver_config import setting

    lam = rt.curvature_info("lowrank").get("eigval_max") if rt.has_lowrank else None
    if isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam):
        return float(setting(rt, "damping_ratio")) * float(lam)
    return FALLBACK_DAMPING


def difference(
    served: Sequence[Example], new: Sequence[Example],
) -> tuple[list[Example], list[Example]]:
    """(added, removed): the examples of `new` not in `served` and those of `served` not in
    `new`, as multisets of (text, label), each in its own order."""
    have = Counter((e.text, e.label) for e in served)
    want = Counter((e.text, e.label) for e in new)
    return _beyond(new, want - have), _beyond(served, have - want)


def _beyond(examples: Sequence[Example], extra: Counter[tuple[str, int]]) -> list[Example]:
    """The first extra[key] examples of every (text, label) key, in order."""
    out = []
    for e in examples:
        key = (e.text, e.label)
        if extra[key] > 0:
            extra[key] -= 1
            out.append(e)
    return out


def require_split(rt: ModelRuntime) -> None:
    """FailedPrecondition (reason SCOPE_SPLIT_UNAVAILABLE) when model `rt` has no scope split
    (model/scope_split.py), which the proximal response runs on."""
    if rt.split is None:
        raise FailedPrecondition(
            f"retrain.mode RETRAIN_MODE_SCOPE_PROXIMAL needs a model split at its influence "
            f"scope (a BERT-family classifier whose scope is its top encoder layers, pooler "
            f"and head), which model {rt.name!r} does not have; use RETRAIN_MODE_SCOPE_ONLY "
            f"or RETRAIN_MODE_FULL", reason="SCOPE_SPLIT_UNAVAILABLE")


def scope_rows_for(rt: ModelRuntime, examples: Sequence[Example]) -> list[Row]:
    """h_L rows [T_i, D] (model dtype) with labels for `examples`: a served training text's
    row comes from the runtime's scope-input cache, a new text's from the trunk (rounded to
    the cache's storage dtype)."""
    require_split(rt)
    cache = rt.scope_inputs()
    assert cache is not None  # the runtime keeps scope inputs whenever it has the split
    index: dict[str, int] = {}
    for i, e in enumerate(rt.bundle.train):
        index.setdefault(e.text, i)
    known = [(k, index[e.text]) for k, e in enumerate(examples) if e.text in index]
    fresh = sorted((k for k, e in enumerate(examples) if e.text not in index),
                   key=lambda k: len(examples[k].text))
    dtype = rt.task.dtype
    out: list[Row | None] = [None] * len(examples)
    if known:
        for (k, _), r in zip(known, rt.scope_rows([i for _, i in known], cache), strict=True):
            out[k] = Row(r.embeds, r.mask, examples[k].label)
    store = DTYPES.get(cache.dtype, dtype)
    for b in range(0, len(fresh), 64):
        chunk = fresh[b : b + 64]
        batch = rt.text_batch([examples[k].text for k in chunk], [examples[k].label for k in chunk])
        for k, h, t in zip(chunk, batch.embeds, batch.mask.sum(dim=1).tolist(), strict=True):
            row = h[: int(t)].to(store).to(dtype)  # [T_k, D]
            out[k] = Row(row, torch.ones(int(t), dtype=torch.long, device=row.device),
                         examples[k].label)
    return [r for r in out if r is not None]


def length_batches(rows: Sequence[Row], batch_tokens: int) -> list[Batch]:
    """Rows sorted by length and padded into batches of at most `batch_tokens` padded tokens
    (at least one row each): [(hidden [B,t,D], mask [B,t], labels [B]), ...]."""
    lengths = [int(r.embeds.shape[0]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    return [pad_rows([rows[j] for j in chunk])
            for chunk in token_batches(order, lengths, len(rows), batch_tokens)]


def minimise(
    split: ScopeSplit, start: dict[str, Tensor], base: Iterable[Batch],
    added: Sequence[Batch], removed: Sequence[Batch], n: int, damping: float,
    cfg: ConvergedConfig, *, should_stop: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Tensor], ConvergedResult]:
    """argmin_θ J(θ) (module docstring) by full-batch L-BFGS from `start` = θ_s: `base` the
    served training set (its labels unused: the KL term is label-free), `added` and
    `removed` the difference, n the N of the 1/N weights. Returns (θ̂ {name: tensor}, what
    happened)."""
    t0 = time.perf_counter()
    anchor = {k: v.detach().clone() for k, v in start.items()}
    with torch.no_grad():  # log p_s(·|x) of every base batch: [B, C] each
        served = [F.log_softmax(split.top(anchor, h, m), dim=-1) for h, m, _ in base]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    leaves = list(params.values())
    evaluations = 0
    last = math.nan
    best = (math.inf, {k: v.detach().clone() for k, v in params.items()})
    non_finite = 0  # evaluations whose J was inf or nan (a line-search trial too far out)

    def closure() -> Tensor:
        nonlocal evaluations, last, best, non_finite
        if should_stop is not None:
            should_stop()
        opt.zero_grad(set_to_none=False)
        total = 0.0
        for (h, m, _), logp_s in zip(base, served, strict=True):
            logp = F.log_softmax(split.top(params, h, m), dim=-1)  # [B, C]
            kl = (logp_s.exp() * (logp_s - logp)).sum() / n  # Σ_b KL(p_s ‖ p_θ) / N
            kl.backward()
            total += float(kl.detach())
        for sign, batches in ((1.0, added), (-1.0, removed)):
            for h, m, y in batches:
                part = sign * F.cross_entropy(split.top(params, h, m), y, reduction="sum") / n
                part.backward()
                total += float(part.detach())
        prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
        prox = 0.5 * damping * prox  # type: ignore[assignment]
        prox.backward()  # type: ignore[union-attr]
        total += float(prox.detach())  # type: ignore[union-attr]
        evaluations += 1
        last = total
        if not math.isfinite(total):
            non_finite += 1
        elif total < best[0]:
            best = (total, {k: v.detach().clone() for k, v in params.items()})
        if progress is not None:
            progress(evaluations, cfg.max_iterations * 2, total)
        return torch.tensor(total, dtype=leaves[0].dtype)

    def grad_max() -> float:
        return max(float(p.grad.abs().max()) for p in leaves if p.grad is not None)

    opt = torch.optim.LBFGS(leaves, lr=1.0)  # replaced below, once ∇J(θ_s) sets the tolerance
    closure()
    g0 = grad_max()
    iterations = 0
    if (added or removed) and g0 > 0:  # D' = D: θ_s is the optimum (∇J(θ_s) is round-off)
        opt = torch.optim.LBFGS(
            leaves, lr=1.0, max_iter=cfg.max_iterations, max_eval=cfg.max_iterations * 2,
            tolerance_grad=cfg.tolerance * g0, tolerance_change=1e-12,
            history_size=cfg.history, line_search_fn="strong_wolfe")
        opt.step(closure)
        iterations = int(opt.state[leaves[0]].get("n_iter", 0))
        closure()  # J and ∇J at the returned point (the last evaluation may be a trial)
        if not math.isfinite(last) or last > best[0]:  # keep the lowest finite J seen
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(best[1][k])
            closure()
    g1 = grad_max()
    result = ConvergedResult(
        iterations=iterations, evaluations=evaluations, objective=last, grad_max=g1,
        grad_max_start=g0, non_finite=non_finite,
        converged=iterations == 0 or g1 <= cfg.tolerance * g0,
        damping=damping, added=sum(int(b[2].shape[0]) for b in added),
        removed=sum(int(b[2].shape[0]) for b in removed), seconds=time.perf_counter() - t0)
    return {k: v.detach() for k, v in params.items()}, result


def retrain_converged(
    rt: ModelRuntime, new_train: Sequence[Example], cfg: ConvergedConfig | None = None, *,
    should_stop: Callable[[], None] | None = None, progress: ProgressFn | None = None,
) -> tuple[Task, TrainResult, ConvergedResult]:
    """A copy of the served Task whose scope parameters are θ̂(new_train), the proximal
    Bregman response (module docstring); the served model is left as it is."""
    cfg = cfg or ConvergedConfig()
    if not new_train:
        raise InvalidArgument.for_field("train", "no training examples")
    for ex in new_train:
        if not 0 <= ex.label < rt.task.num_labels:
            raise InvalidArgument.for_field(
                "train", f"label {ex.label} of {ex.text[:40]!r} is outside "
                f"[0, {rt.task.num_labels})")
    served_train = list(rt.bundle.train)
    added, removed = difference(served_train, new_train)
    damping = cfg.damping if cfg.damping is not None else default_damping(rt)

    def batches(examples: Sequence[Example]) -> list[Batch]:
        return length_batches(scope_rows_for(rt, examples), cfg.batch_tokens) \
            if examples else []

    base = TrainingBatches(rt, cfg.batch_tokens)
    served = rt.task
    task = Task(copy.deepcopy(served.model), served.tokenizer, list(served.labels), served.scope,
                served.device)
    task.model.eval()
    split = ScopeSplit.for_task(task)
    assert split is not None  # scope_rows_for checked the served model's split
    theta, result = minimise(split, task.scope_params(), base, batches(added), batches(removed),
                             len(served_train), damping, cfg, should_stop=should_stop,
                             progress=progress)
    live = dict(task.model.named_parameters())
    with torch.no_grad():
        for name, value in theta.items():
            live[name].copy_(value)
    return task, TrainResult(result.iterations, result.objective, result.seconds), result
