"""Attack and Repair on a tiny 3-class model (the paper's AG News has 4): the strongest wrong
label y' is the argmax of the other classes, every PROMOTE_WRONG edit raises I(z, m_y') for
that y' (recomputed independently), COMBINED perturbs no training example twice, repair targets
each error's own predicted class, and the margin helper is z_y − max_{c≠y} z_c."""

from __future__ import annotations

import pytest
import torch

from pairdots_server.core.grads import per_example_loss_grads_loop
from pairdots_server.core.influence import perturbed_influence
from pairdots_server.core.measure import grad_theta_margin
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.influence.solver_policy import SolverChoice, SolverSettings, solve_s_test
from pairdots_server.model.train import TrainConfig, evaluate, fine_tune
from pairdots_server.perturb.attack import PROMOTE, AttackMode, AttackQuery, run_attack
from pairdots_server.perturb.objectives import TargetCache, margins
from pairdots_server.perturb.repair import LOWER_WRONG, RepairQuery, find_errors, run_repair
from pairdots_server.storage.bundle import load_bundle, save_bundle
from pairdots_server.storage.data import Example
from pairdots_server.testing import BASE_WORDS, make_tiny_task, tiny_examples, words_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CG = SolverSettings(method=SolverChoice.CG, max_iterations=40, damping=0.01)
SETTINGS = InfluenceSettings(solver=CG, use_index=False)
LABELS = ("negative", "positive", "about a film")


def three_class(examples: list[Example]) -> list[Example]:
    """SST-2 sentences, relabelled 2 when they mention 'film' or 'movie' (a learnable cue)."""
    return [Example(x.text, 2 if {"film", "movie"} & set(x.text.split()) else x.label)
            for x in examples]


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    train = three_class(tiny_examples(60))
    dev = three_class(tiny_examples(40, split="dev"))
    assert {x.label for x in train} == {0, 1, 2}
    vocab = list(BASE_WORDS) + words_of(x.text for x in train + dev)
    task = make_tiny_task(vocab, labels=LABELS, dtype=torch.float64)
    cfg = TrainConfig(epochs=1000, batch_size=16, lr=3e-3, warmup_ratio=0.0, max_length=64,
                      max_steps=60)
    fine_tune(task, train, cfg)
    root = tmp_path_factory.mktemp("multiclass")
    extra = {"train": cfg.to_dict(), "model": {"source": "tiny 3-class"},
             "dataset": {"path": "tiny:sst2-head-3class"}}
    return ModelRuntime(load_bundle(save_bundle(root, "tiny3", task, train, extra)))


def dev_set() -> tuple[Example, ...]:
    return tuple(three_class(tiny_examples(40, split="dev")))


def test_margin_is_the_gap_to_the_strongest_other_class(rt: ModelRuntime) -> None:
    xs = list(dev_set()[:6])
    got = margins(rt.task, xs, rt.max_length)
    for x, m in zip(xs, got, strict=True):
        enc = rt.task.encode([x.text], max_length=rt.max_length)
        with torch.no_grad():
            z = rt.task.forward_ids(enc.input_ids, enc.attention_mask)[0].double()
        others = [float(z[c]) for c in range(3) if c != x.label]
        assert m == pytest.approx(float(z[x.label]) - max(others), abs=1e-6)


def test_promote_wrong_targets_the_strongest_wrong_class(rt: ModelRuntime) -> None:
    xs = dev_set()
    ev = evaluate(rt.task, list(xs), max_length=rt.max_length)
    correct = tuple(x for x, p in zip(xs, ev.predictions, strict=True) if p == x.label)[:3]
    assert correct
    cache = TargetCache()  # shared with the COMBINED run below (its PROMOTE targets)
    out = run_attack(rt, AttackQuery(correct, AttackMode.PROMOTE_WRONG, 2, random_candidates=2,
                                     influence=SETTINGS), lambda: None,
                     default_candidates=rt.n_train, target_cache=cache)
    assert out.edits, out.notes
    probs = rt.task.predict([x.text for x in correct], max_length=rt.max_length)
    s_tests: dict[int, torch.Tensor] = {}  # independent s_test per test example
    for e in out.edits:
        x = correct[e.example_index]
        p = probs[e.example_index].clone()
        p[x.label] = -1.0
        y_wrong = int(p.argmax())
        if e.example_index not in s_tests:
            enc = rt.task.encode([x.text], max_length=rt.max_length)
            emb = rt.task.embed(enc.input_ids).detach()
            g = grad_theta_margin(rt.task.logits_fn, rt.params, emb, enc.attention_mask,
                                  y_wrong)
            s_tests[e.example_index] = solve_s_test(rt, g, CG, lambda: None)[0]
        s_test = s_tests[e.example_index]
        grads = []
        for text in (e.original_text, e.new_text):
            t = rt.task.encode([text], max_length=rt.max_length)
            grads.append(per_example_loss_grads_loop(
                rt.task.logits_fn, rt.params, rt.task.embed(t.input_ids).detach(),
                t.attention_mask, torch.tensor([e.label])))
        change = float(perturbed_influence(s_test, grads[0], grads[1])[0])
        assert e.objective == PROMOTE and change > 0
        assert change == pytest.approx(e.influence_change, rel=1e-6, abs=1e-12)
    combined = run_attack(rt, AttackQuery(correct, AttackMode.COMBINED, 4, random_candidates=2,
                                          influence=SETTINGS), lambda: None,
                          default_candidates=rt.n_train, target_cache=cache)
    assert len({e.train_index for e in combined.edits}) == len(combined.edits)


def test_repair_targets_each_errors_predicted_class(rt: ModelRuntime) -> None:
    xs = dev_set()
    errors = find_errors(rt, xs)
    assert len({p for _, p in errors}) >= 2, errors  # errors of more than one class
    picked = tuple(xs[k] for k, _ in errors[:4])
    predicted = [p for _, p in errors[:4]]
    cache = TargetCache()
    out = run_repair(rt, RepairQuery(picked, 2, random_candidates=2, influence=SETTINGS),
                     lambda: None, default_candidates=rt.n_train, target_cache=cache)
    assert out.errors_found == len(picked)
    for k, x in enumerate(picked):
        assert (x.text, predicted[k], False) in cache.targets  # the wrong class's target was built
    for e in out.edits:
        if e.objective == LOWER_WRONG:
            tgt = cache.targets[(picked[e.example_index].text, predicted[e.example_index], False)]
            assert tgt is not None and e.influence_after < 0
    assert [r.label for r in out.reports] == [x.label for x in picked]
    assert all(r.margin < 0 for r in out.reports)
