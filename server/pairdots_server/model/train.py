"""Fine-tuning and evaluation of a Task's classifier (also reused to retrain after the §4.2
attack and §4.3 repair perturb the training set).

Objective: mean cross-entropy (1/|B|) Σ_{z∈B} -log p(y|x; θ) minimised with AdamW
(decoupled weight decay, biases and LayerNorm weights excluded) under a linear warm-up /
linear decay learning-rate schedule. Seeded: the batch order comes from a
``torch.Generator`` seeded by ``seed``, and the dropout masks of step s from the global RNG
re-seeded to ``step_seed(seed, s)`` before that step, so a CPU run is repeatable bit for bit.

Why per step: a dropout mask has the shape of its batch ([b, T, D], T the batch's longest
text), so with one seed for the whole run, a training example whose length changes (an
attack's synonym with another number of word pieces) changes how many random numbers its
batch draws, and every later step of the retrain then gets other masks: the retrained model
differs by a fresh dropout draw, not by the edit. Re-seeded per step, only the edited
example's own batch sees other masks, so a retrain responds to what was changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pairdots_server.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

    from pairdots_server.model.task import Task
    from pairdots_server.storage.data import Example

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters.

    epochs: passes over the data; batch_size: examples per step; lr: AdamW peak learning
    rate; weight_decay: AdamW decay (not on biases/LayerNorm); warmup_ratio: fraction of the
    steps spent in linear warm-up, then linear decay to 0; max_length: token truncation;
    seed: batch order + dropout; max_steps: stop after this many steps (None = all epochs);
    scope_only: train only the influence-scope parameters (fast retrain).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 64
    seed: int = 0
    max_steps: int | None = None
    scope_only: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidArgument:
            return InvalidArgument.for_field(f"train.{name}", why)

        if self.epochs < 1:
            raise bad("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", f"must be a positive finite number, got {self.lr}")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 8:
            raise bad("max_length", f"must be >= 8 tokens, got {self.max_length}")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be >= 1 or None, got {self.max_steps}")

    def to_dict(self) -> dict[str, object]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TrainConfig:
        from dataclasses import fields

        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise InvalidArgument.for_field("train", f"unknown keys {sorted(unknown)}")
        return cls(**d)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float  # mean loss over the last min(20, steps) steps
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    predictions: list[int]
    loss: float  # mean cross-entropy


def _param_groups(
    task: Task, scope_only: bool, weight_decay: float
) -> tuple[list[torch.nn.Parameter], list[dict[str, object]]]:
    names = set(task.scope_names) if scope_only else None
    decay, no_decay = [], []
    for name, p in task.model.named_parameters():
        if names is not None and name not in names:
            continue
        if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups: list[dict[str, object]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return decay + no_decay, groups


def step_seed(seed: int, step: int) -> int:
    """The global RNG seed of training step `step` of a run seeded by `seed` (its dropout
    masks): distinct per (seed, step), independent of what earlier steps drew."""
    return (seed * 1_000_003 + step) % 2**63


def fine_tune(
    task: Task,
    examples: Sequence[Example],
    cfg: TrainConfig | None = None,
    progress: bool | ProgressFn = False,
    should_stop: Callable[[], None] | None = None,
) -> TrainResult:
    """Fine-tune ``task.model`` in place on ``examples``; leaves it in eval mode with all
    parameters back at requires_grad=False (the Task convention).

    progress: True → tqdm bar; a callable → called as (step, total, loss) after every step.
    should_stop: called before every step; raise (e.g. errors.Cancelled) to stop.
    """
    import torch

    cfg = cfg or TrainConfig()
    if not examples:
        raise InvalidArgument.for_field("train", "no training examples")
    for ex in examples:
        if not 0 <= ex.label < task.num_labels:
            raise InvalidArgument.for_field(
                "train", f"label {ex.label} of {ex.text[:40]!r} is outside [0, {task.num_labels})"
            )
    n = len(examples)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = round(cfg.warmup_ratio * total)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    torch.manual_seed(step_seed(cfg.seed, 0))
    gen = torch.Generator().manual_seed(cfg.seed)
    params, groups = _param_groups(task, cfg.scope_only, cfg.weight_decay)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="fine-tune", unit="step")
    callback = progress if callable(progress) else None

    t0 = time.perf_counter()
    recent: list[float] = []
    step = 0
    task.model.train()
    try:
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, cfg.batch_size):
                if step >= total:
                    break
                if should_stop is not None:
                    should_stop()
                batch = [examples[i] for i in order[start : start + cfg.batch_size]]
                torch.manual_seed(step_seed(cfg.seed, step))  # this step's dropout masks
                enc = task.encode([ex.text for ex in batch], max_length=cfg.max_length)
                y = torch.tensor([ex.label for ex in batch], device=task.device)  # [b]
                logits = task.forward_ids(enc.input_ids, enc.attention_mask)  # [b, C]
                loss = task.loss(logits, y).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
                value = float(loss.detach())
                recent = (recent + [value])[-20:]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                if callback is not None:
                    callback(step, total, value)
    finally:
        if bar is not None:
            bar.close()
        task.model.eval()
        task.model.requires_grad_(False)
    return TrainResult(
        steps=step,
        final_loss=sum(recent) / max(1, len(recent)),
        seconds=time.perf_counter() - t0,
    )


def evaluate(
    task: Task, examples: Sequence[Example], batch_size: int = 64, max_length: int = 128
) -> EvalResult:
    """Accuracy = mean(argmax p(·|x) == y) and mean cross-entropy on ``examples``."""
    import torch

    if not examples:
        raise InvalidArgument.for_field("eval", "no evaluation examples")
    preds: list[int] = []
    total_loss = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            enc = task.encode([ex.text for ex in batch], max_length=max_length)
            y = torch.tensor([ex.label for ex in batch], device=task.device)  # [b]
            logits = task.forward_ids(enc.input_ids, enc.attention_mask)  # [b, C]
            total_loss += float(task.loss(logits, y).sum())
            preds.extend(int(p) for p in logits.argmax(dim=-1).tolist())
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples))
    return EvalResult(
        accuracy=correct / len(examples), predictions=preds, loss=total_loss / len(examples)
    )
