"""Fine-tuning: reduces the loss, is deterministic for a seed, respects scope_only/should_stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pairdots_server.errors import Cancelled, CancelToken, InvalidArgument
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainConfig, evaluate, fine_tune
from pairdots_server.testing import synthetic_examples

CFG = TrainConfig(epochs=8, batch_size=8, lr=3e-3, warmup_ratio=0.1, max_length=32, seed=1)


def _task(tiny_dir: Path) -> Task:
    return Task.from_pretrained(tiny_dir, labels=["negative", "positive"], dtype=torch.float64)


def _state(task: Task) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def test_fine_tune_reduces_loss_and_is_deterministic(tiny_dir: Path) -> None:
    train = synthetic_examples(48, seed=3)
    a = _task(tiny_dir)
    before = evaluate(a, train, batch_size=16)
    steps: list[int] = []
    res = fine_tune(a, train, CFG, progress=lambda s, total, loss: steps.append(s))
    after = evaluate(a, train, batch_size=16)
    assert res.steps == 8 * 6 and steps == list(range(1, 49))
    assert after.loss < 0.5 * before.loss
    assert after.accuracy >= 0.9
    # the Task convention is restored: eval mode, no parameter requires grad
    assert not a.model.training
    assert not any(p.requires_grad for p in a.model.parameters())

    b = _task(tiny_dir)
    res_b = fine_tune(b, train, CFG)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert res_b.final_loss == res.final_loss

    c = _task(tiny_dir)
    fine_tune(c, train, TrainConfig(**{**CFG.to_dict(), "seed": 2}))  # type: ignore[arg-type]
    assert not torch.equal(_state(c)["classifier.weight"], sa["classifier.weight"])


def test_scope_only_trains_only_the_scope(tiny_dir: Path) -> None:
    task = _task(tiny_dir)
    start = _state(task)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, max_steps=3, scope_only=True)
    res = fine_tune(task, synthetic_examples(16), cfg)
    assert res.steps == 3
    end = _state(task)
    scope = set(task.scope_names)
    for name, _ in task.model.named_parameters():
        changed = not torch.equal(start[name], end[name])
        assert changed == (name in scope), name


def test_should_stop_cancels(tiny_dir: Path) -> None:
    task = _task(tiny_dir)
    token = CancelToken()
    calls = []

    def progress(step: int, total: int, loss: float) -> None:
        calls.append(step)
        if step == 2:
            token.cancel("stop now")

    with pytest.raises(Cancelled, match="stop now"):
        fine_tune(
            task,
            synthetic_examples(64),
            TrainConfig(batch_size=4),
            progress=progress,
            should_stop=token.check,
        )
    assert calls == [1, 2]
    assert not task.model.training
    assert not any(p.requires_grad for p in task.model.parameters())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"epochs": 0}, "train.epochs"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"lr": 0.0}, "train.lr"),
        ({"lr": float("nan")}, "train.lr"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
        ({"max_length": 4}, "train.max_length"),
        ({"max_steps": 0}, "train.max_steps"),
        ({"weight_decay": -1.0}, "train.weight_decay"),
    ],
)
def test_train_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        TrainConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.violations[0].field == field


def test_train_config_dict_roundtrip() -> None:
    cfg = TrainConfig(epochs=2, max_steps=7, scope_only=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidArgument, match="unknown keys"):
        TrainConfig.from_dict({"epochs": 1, "momentum": 0.9})


def test_bad_labels_rejected(tiny_task: Task) -> None:
    from pairdots_server.storage.data import Example

    with pytest.raises(InvalidArgument, match="outside"):
        fine_tune(tiny_task, [Example("good", 2)], TrainConfig())
    with pytest.raises(InvalidArgument):
        fine_tune(tiny_task, [], TrainConfig())


def test_evaluate_matches_predict(tiny_task: Task) -> None:
    exs = synthetic_examples(10, seed=5)
    ev = evaluate(tiny_task, exs, batch_size=3)
    probs = tiny_task.predict([e.text for e in exs])
    assert ev.predictions == probs.argmax(-1).tolist()
    want = sum(int(p == e.label) for p, e in zip(ev.predictions, exs)) / 10
    assert ev.accuracy == want
    nll = -torch.log(probs[torch.arange(10), torch.tensor([e.label for e in exs])]).mean()
    assert ev.loss == pytest.approx(float(nll), rel=1e-9)


def _dropout_zero_patterns(task: Task, train: list, cfg: TrainConfig) -> list[list[torch.Tensor]]:
    """Per training step, the zero pattern of every dropout module's output (= its mask:
    the inputs are never exactly 0)."""
    steps: list[list[torch.Tensor]] = [[]]
    mods = [m for m in task.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert mods and all(m.p > 0 for m in mods)
    hooks = [m.register_forward_hook(lambda _m, _i, out: steps[-1].append(out == 0))
             for m in mods]
    try:
        fine_tune(task, train, cfg, progress=lambda s, total, loss: steps.append([]))
    finally:
        for h in hooks:
            h.remove()
    return steps[:-1]


def test_a_changed_example_changes_only_its_own_steps_dropout(tiny_dir: Path) -> None:
    """Lengthening one training example (an attack's longer synonym) changes the dropout masks
    of the steps whose batch holds it and of no other step: a retrain's difference is the
    edit's, not a reshuffled random stream."""
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, max_length=32, seed=4)
    train = synthetic_examples(32, seed=5)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    first = order[0]  # in step 1's batch
    longer = list(train)
    longer[first] = type(train[first])(train[first].text + " and then some more words here",
                                       train[first].label)
    a = _dropout_zero_patterns(_task(tiny_dir), train, cfg)
    b = _dropout_zero_patterns(_task(tiny_dir), longer, cfg)
    assert len(a) == len(b) == 4
    assert a[0][0].shape != b[0][0].shape  # step 1's batch got longer
    for step in range(1, 4):  # the later batches are the same texts: the same masks
        assert len(a[step]) == len(b[step])
        for x, y in zip(a[step], b[step], strict=True):
            assert torch.equal(x, y), f"step {step + 1}: other dropout masks"
