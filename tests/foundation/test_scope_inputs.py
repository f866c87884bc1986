"""The scope split and the scope-input cache (issue 13 item 1) against the full-model path, on
a tiny float64 BERT bundle; and Eq. 8 with the split and in top-k mode (item 2).

Reference: Task.logits_fn through every layer (what Explain ran before): exact scoring by one
jvp of the full model per batch (pipeline._influence) and Eq. 8 one example at a time
(pipeline.word_attribution). Tolerances are float64 round-off: 1e-9 of the largest value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.artifacts import add_scope_inputs
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.scope_inputs import SCOPE_INPUTS_FILE
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.scope_split import ScopeSplit
from pairdots_server.model.task import Task
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.update import update_bundle
from pairdots_server.testing import make_tiny_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-9  # float64 round-off, relative to the largest |value|
IDX = [7, 3, 20, 12, 3, 0, 31, 21, 5, 9]  # any order, a repeat


@pytest.fixture(scope="module")
def rt64(root64: Path) -> ModelRuntime:
    """The float64 bundle's runtime (shared by the tests that do not change it)."""
    return _rt(root64 / "t64")


@pytest.fixture(scope="module")
def root64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scope-inputs")
    make_tiny_bundle(root, "t64", n_train=32, finetune_steps=8, dtype=torch.float64)
    make_tiny_bundle(root, "t64b", n_train=32, finetune_steps=8, dtype=torch.float64, seed=1)
    return root


def _rt(path: Path, **kw: object) -> ModelRuntime:
    return ModelRuntime(load_bundle(path), **kw)  # type: ignore[arg-type]


def _s_test(rt: ModelRuntime) -> tuple[torch.Tensor, steps.PipelineSettings]:
    """A seeded direction for s_test (the identities hold for any direction) and settings."""
    settings = InfluenceSettings().resolve(rt, default_candidates=8, scoring_batch_size=4)
    g = torch.Generator().manual_seed(1)
    s_test = torch.randn(rt.num_params, generator=g, dtype=torch.float64) / rt.num_params**0.5
    return s_test, settings


def _full_path(rt: ModelRuntime, s_test: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Today's path: one jvp of the full model over the padded batch."""
    return steps._influence(rt, s_test, rt.encode_train(idx)).double()


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> bool:
    scale = float(ref.abs().max())
    return scale > 0 and float((got - ref).abs().max()) <= tol * scale


@pytest.mark.parametrize("scope", [ScopeSpec(), ScopeSpec("head"), ScopeSpec("last_n", 2)])
def test_split_top_of_trunk_equals_the_full_model(tiny_task: Task, scope: ScopeSpec) -> None:
    tiny_task.set_scope(scope)
    split = ScopeSplit.for_task(tiny_task)
    assert split is not None
    enc = tiny_task.encode(["the movie was good .", "bad", "a long , long sentence here"])
    e = tiny_task.embed(enc.input_ids)
    g = torch.Generator().manual_seed(0)
    params = {
        k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in tiny_task.scope_params().items()
    }  # not the model's own θ
    full = tiny_task.logits_fn(params, e, enc.attention_mask)
    top = split.top(params, split.trunk(e, enc.attention_mask), enc.attention_mask)
    assert float((top - full).abs().max()) <= TOL * float(full.abs().max())
    # and it does use the scoped parameters it is given
    assert (
        float(
            (top - split.top({}, split.trunk(e, enc.attention_mask), enc.attention_mask))
            .abs()
            .max()
        )
        > 1e-6
    )


def test_no_split_when_the_scope_reaches_below_the_layers(tiny_task: Task) -> None:
    tiny_task.set_scope(ScopeSpec("all"))  # embedding LayerNorm and position embeddings
    assert ScopeSplit.for_task(tiny_task) is None


def test_cached_scoring_equals_the_full_model_path(root64: Path) -> None:
    rt = _rt(root64 / "t64")
    s_test, settings = _s_test(rt)
    got = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    assert _close(got, _full_path(rt, s_test, IDX))
    cache = rt.scope_inputs()
    assert cache is not None and cache.computed == len(set(IDX)) and cache.loaded == 0
    # a runtime without the cache answers the same
    plain = _rt(root64 / "t64", scope_inputs=False)
    assert plain.scope_inputs() is None
    assert _close(steps.score_examples(plain, s_test, IDX, settings, steps.no_stop), got)


def _row_bytes(rt: ModelRuntime, idx: list[int]) -> list[int]:
    """Bytes of each training example's h_L row, from an unbounded cache (independent)."""
    free = _rt(rt.bundle.path, scope_input_max_bytes=None).scope_inputs()
    assert free is not None
    return [r.numel() * r.element_size() for r in free.rows(idx)]


def test_bounded_cache_scores_the_same_and_stays_within_its_bytes(root64: Path) -> None:
    probe = _rt(root64 / "t64")
    cap = sum(sorted(_row_bytes(probe, list(range(probe.n_train))))[-3:])  # ≥ any 3 rows
    rt = _rt(root64 / "t64", scope_input_max_bytes=cap)
    s_test, settings = _s_test(rt)
    ref = _full_path(rt, s_test, IDX)
    got = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    assert _close(got, ref)  # one call needing more rows than the bound still gets them all
    cache = rt.scope_inputs()
    assert cache is not None
    assert cache.nbytes <= cap and 3 <= len(cache) < len(set(IDX))
    assert cache.evicted == cache.computed - len(cache) > 0
    # again: evicted rows are recomputed, the answer is the same
    before = cache.computed
    again = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    assert _close(again, ref) and cache.computed > before and cache.nbytes <= cap


def test_bounded_cache_evicts_the_least_recently_used_row(root64: Path) -> None:
    probe = _rt(root64 / "t64")
    sizes = _row_bytes(probe, list(range(probe.n_train)))
    by_size = sorted(range(probe.n_train), key=lambda i: (sizes[i], i))
    d, b = by_size[0], by_size[-1]  # d is no larger than b: adding d evicts b alone
    a, c = by_size[1], by_size[2]
    rt = _rt(root64 / "t64", scope_input_max_bytes=sizes[a] + sizes[b] + sizes[c])
    cache = rt.scope_inputs()
    assert cache is not None
    for i in (a, b, c):  # held: a, b, c (a least recent)
        cache.rows([i])
    assert cache.computed == 3 and cache.evicted == 0
    cache.rows([a])  # a hit: a becomes the most recent, b the least recent
    assert cache.computed == 3
    cache.rows([d])
    assert cache.evicted == 1
    cache.rows([a, c, d])
    assert cache.computed == 4  # a, c and d still held
    cache.rows([b])
    assert cache.computed == 5  # b was the one evicted
    with pytest.raises(ValueError, match="max_bytes None"):
        cache.to_tensors()  # a bounded cache cannot write the bundle file


def test_zero_byte_cache_still_answers(root64: Path) -> None:
    rt = _rt(root64 / "t64", scope_input_max_bytes=0)
    s_test, settings = _s_test(rt)
    got = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    assert _close(got, _full_path(rt, s_test, IDX))
    cache = rt.scope_inputs()
    assert cache is not None and len(cache) == 0 and cache.nbytes == 0


def test_float16_rows_within_stated_tolerance(root64: Path) -> None:
    rt = _rt(root64 / "t64", scope_input_dtype="float16")
    s_test, settings = _s_test(rt)
    got = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    cache = rt.scope_inputs()
    assert cache is not None and cache.rows([0])[0].dtype == torch.float16
    # fp16 rounding of h_L (relative 2^-11): scores within 1 % of the largest
    ref = _full_path(rt, s_test, IDX)
    assert _close(got, ref, 1e-2)
    assert not _close(got, ref, 1e-12)  # the rounding is really there


def test_bundle_file_is_used_when_it_matches(root64: Path, tmp_path: Path) -> None:
    path = tmp_path / "t64"
    shutil.copytree(root64 / "t64", path)
    add_scope_inputs(path, _rt(path), dtype="float64", progress=False)
    rt = _rt(path)
    assert rt.bundle.has_artifact(SCOPE_INPUTS_FILE)
    s_test, settings = _s_test(rt)
    got = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    cache = rt.scope_inputs()
    assert cache is not None and cache.loaded == rt.n_train and cache.computed == 0
    assert rt.scope_inputs_note == ""
    assert _close(got, _full_path(rt, s_test, IDX))


def test_stale_bundle_file_is_not_used(root64: Path, tmp_path: Path) -> None:
    """Another model's scope inputs (same training set, other weights) under this bundle: the
    key (weights digest) differs, so the file is ignored and the scores stay exact. Trusting
    it would give other scores (checked, so this test can fail)."""
    other = tmp_path / "t64b"
    shutil.copytree(root64 / "t64b", other)
    add_scope_inputs(other, _rt(other), dtype="float64", progress=False)
    path = tmp_path / "t64"
    shutil.copytree(root64 / "t64", path)
    update_bundle(path, {SCOPE_INPUTS_FILE: other / SCOPE_INPUTS_FILE}, {})
    rt = _rt(path)
    s_test, settings = _s_test(rt)
    got = steps.score_examples(rt, s_test, IDX, settings, steps.no_stop)
    cache = rt.scope_inputs()
    assert cache is not None and cache.loaded == 0 and cache.computed == len(set(IDX))
    assert "key does not match" in rt.scope_inputs_note
    ref = _full_path(rt, s_test, IDX)
    assert _close(got, ref)
    # what the stale rows would have given
    from safetensors import safe_open

    stale = _rt(path)
    c = stale.scope_inputs()
    assert c is not None
    with safe_open(str(path / SCOPE_INPUTS_FILE), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    c.key = meta["key"]  # force it in
    assert c.load(tensors, meta) is None
    wrong = steps.score_examples(stale, s_test, IDX, settings, steps.no_stop)
    assert not _close(wrong, ref, 1e-3)


def _one_by_one(rt: ModelRuntime, s_test: torch.Tensor, i: int) -> list[float]:
    enc = steps.encode_train_example(rt, i)
    return steps.word_attribution(rt, s_test, enc, rt.bundle.train[i].label)


def test_eq8_with_the_split_equals_one_by_one_full_model(rt64: ModelRuntime) -> None:
    rt = rt64
    assert rt.split is not None
    s_test, _ = _s_test(rt)
    idx = [3, 11, 0, 25]
    got = steps.word_attributions(rt, s_test, idx)
    for i, att in zip(idx, got, strict=True):
        ref = torch.tensor(_one_by_one(rt, s_test, i))
        assert all(att.exact)
        assert _close(torch.tensor(att.totals), ref)


def test_eq8_top_words_scores_the_chosen_words_exactly(rt64: ModelRuntime) -> None:
    rt = rt64
    s_test, settings = _s_test(rt)
    idx = [3, 11, 0, 25]
    memo = steps.ScoreMemo()
    steps.score_examples(rt, s_test, idx, settings, steps.no_stop, memo=memo)
    keep = rt.bundle.train[11].text.split()[0]  # a word of example 11
    got = steps.word_attributions(rt, s_test, idx, memo=memo, top_words=1, keep_word=keep)
    estimates = steps._first_order(
        rt, s_test, idx, [steps.encode_train_example(rt, i) for i in idx], 4096
    )
    for i, att, est in zip(idx, got, estimates, strict=True):
        ref = _one_by_one(rt, s_test, i)
        scale = max(abs(v) for v in ref)
        seen = [
            w
            for w in range(len(att.words))
            if any(t for t in steps.encode_train_example(rt, i).positions(w))
        ]
        exact = [w for w in seen if att.exact[w]]
        assert 1 <= len(exact) <= len(seen)
        for w in range(len(att.words)):
            want = ref[w] if att.exact[w] else est.totals[w]
            assert abs(att.totals[w] - want) <= TOL * scale
        sign = 1.0 if memo.scores[i] >= 0 else -1.0
        best_est = max(seen, key=lambda w: (sign * est.totals[w], -w))
        assert att.exact[best_est]  # the estimate's best word was scored exactly
    e11 = steps.encode_train_example(rt, 11)
    k = [w for w, txt in enumerate(e11.words) if txt.lower() == keep.lower()]
    assert k and all(got[1].exact[w] for w in k)  # the explained word's matches are exact
    # asking again for every word completes the memo's entries, equal to the full path
    full = steps.word_attributions(rt, s_test, idx, memo=memo)
    for i, att in zip(idx, full, strict=True):
        assert all(att.exact)
        assert _close(torch.tensor(att.totals), torch.tensor(_one_by_one(rt, s_test, i)))


def test_first_order_batched_equals_one_row_at_a_time(rt64: ModelRuntime) -> None:
    from pairdots_server.core.influence import token_influence_fast

    rt = rt64
    s_test, _ = _s_test(rt)
    idx = [3, 11, 0, 25]  # different lengths: padded in one batch
    encs = [steps.encode_train_example(rt, i) for i in idx]
    batched = steps._first_order(rt, s_test, idx, encs, 4096)
    for i, e, att in zip(idx, encs, batched, strict=True):
        one = token_influence_fast(
            rt.task.logits_fn,
            rt.params,
            s_test,
            e.embeds,
            e.mask,
            rt.bundle.train[i].label,
            rt.unk_embed,
            e.word_positions,
        )
        totals = [0.0] * len(e.words)
        for t in e.word_positions:
            totals[e.word_ids[t]] += float(one[t])  # type: ignore[index]
        assert _close(torch.tensor(att.totals), torch.tensor(totals))


def test_index_gradients_through_the_split_equal_the_full_model(rt64: ModelRuntime) -> None:
    from pairdots_server.core.grads import per_example_loss_grads
    from pairdots_server.influence.artifacts import train_grad_fn

    rt = rt64
    assert rt.split is not None
    idx = [3, 11, 0, 25, 8]
    got = train_grad_fn(rt)(idx)  # [B,P] via trunk + vmap(grad) of the top
    enc = rt.encode_train(idx)
    ref = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= TOL * float(ref.abs().max())


def test_index_build_by_length_keeps_every_vector_on_its_example(rt64: ModelRuntime,
                                                                 tmp_path: Path) -> None:
    """build_index_dir batches the training set in order of text length; each stored vector
    must still be the projection of its own example's full-model gradient."""
    from pairdots_server.core.grads import per_example_loss_grads
    from pairdots_server.index.store import load_index_data
    from pairdots_server.influence.artifacts import ArtifactConfig, build_index_dir

    rt = rt64
    lengths = [len(ex.text) for ex in rt.bundle.train]
    assert lengths != sorted(lengths)  # the length order really differs from index order
    cfg = ArtifactConfig(grad_batch_size=5)
    ids, vectors, meta = load_index_data(build_index_dir(rt, cfg, tmp_path / "index",
                                                         progress=False))
    assert ids.tolist() == list(range(rt.n_train))
    enc = rt.encode_train(list(range(rt.n_train)))
    ref = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels)
    want = meta.projection().project(ref).float().numpy()  # [N,k]
    scale = float(abs(want).max())
    assert float(abs(vectors - want).max()) <= 1e-5 * scale  # float32 storage
