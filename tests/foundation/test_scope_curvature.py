"""The curvature paths through the scope split (influence/runtime.train_batch): the curvature
operator of the iterative solvers, the low-rank (Lanczos) fit and the EK-FAC / diagonal fits
run the scoped top from the cached h_L instead of the whole model. The reference is the same
runtime built without the split (scope_inputs=False: word embeddings through Task.logits_fn),
an independent path through every layer; both must give the same numbers up to round-off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pairdots_server.core.curvature import Curvature
from pairdots_server.influence.artifacts import (
    CurvatureConfig,
    fit_diagonal_artifact,
    fit_ekfac_artifact,
    fit_lowrank_artifact,
)
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.solvers_iterative import curvature_operator
from pairdots_server.storage.bundle import load_bundle

CFG = CurvatureConfig(batch_size=8)


@pytest.fixture(scope="module")
def pair(tiny_bundle_root: Path) -> tuple[ModelRuntime, ModelRuntime]:
    """(runtime with the scope split, the same bundle without it)."""
    split = ModelRuntime(load_bundle(tiny_bundle_root / "tiny"))
    full = ModelRuntime(load_bundle(tiny_bundle_root / "tiny"), scope_inputs=False)
    assert split.split is not None and full.split is None
    return split, full


def _tensors(content: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(content)


def test_training_batches_feed_the_scoped_top(pair: tuple[ModelRuntime, ModelRuntime]) -> None:
    split, full = pair
    idx = [3, 0, 7]
    hb, eb = split.train_batch(idx), full.train_batch(idx)
    d = split.task.model.config.hidden_size
    assert hb.embeds.shape[0] == 3 and hb.embeds.shape[2] == d
    torch.testing.assert_close(hb.mask, eb.mask)
    torch.testing.assert_close(hb.labels, eb.labels)
    with torch.no_grad():
        torch.testing.assert_close(
            split.curvature_logits_fn(split.params, hb.embeds, hb.mask),
            full.curvature_logits_fn(full.params, eb.embeds, eb.mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("curvature", [Curvature.GGN, Curvature.HESSIAN])
def test_curvature_operator_matches_the_full_model(
    pair: tuple[ModelRuntime, ModelRuntime], curvature: Curvature,
) -> None:
    split, full = pair
    v = torch.randn(split.num_params, generator=torch.Generator().manual_seed(1))
    hv_split = curvature_operator(split, curvature, 0).matvec(v)
    hv_full = curvature_operator(full, curvature, 0).matvec(v)
    assert float(hv_full.norm()) > 0
    torch.testing.assert_close(hv_split, hv_full, rtol=1e-4, atol=1e-5 * float(hv_full.abs().max()))


def test_ekfac_and_diagonal_fits_match_the_full_model(
    pair: tuple[ModelRuntime, ModelRuntime],
) -> None:
    split, full = pair
    for fit in (fit_ekfac_artifact, fit_diagonal_artifact):
        a = _tensors(fit(split, CFG, progress=False).content)
        b = _tensors(fit(full, CFG, progress=False).content)
        assert a.keys() == b.keys()
        for k in a:
            if "/q_" in k:
                continue  # eigenvectors: sign / rotation within repeated eigenvalues is free
            scale = float(b[k].abs().max()) or 1.0
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_lowrank_fit_matches_the_full_model(pair: tuple[ModelRuntime, ModelRuntime]) -> None:
    split, full = pair
    a = _tensors(fit_lowrank_artifact(split, 4, progress=False).content)
    b = _tensors(fit_lowrank_artifact(full, 4, progress=False).content)
    assert a["eigvals"].numel() == 4 and float(b["eigvals"].max()) > 0
    torch.testing.assert_close(a["eigvals"], b["eigvals"], rtol=1e-3,
                               atol=1e-6 * float(b["eigvals"].abs().max()))


def test_prepare_takes_the_diagonal_from_the_index_pass(
    pair: tuple[ModelRuntime, ModelRuntime], tmp_path: Path,
) -> None:
    """build_bundle_artifacts (what prepare runs) accumulates the diagonal empirical Fisher
    from the index's per-example gradients: the same d as its own pass (fit_diagonal)."""
    from pairdots_server.influence.artifacts import ArtifactConfig, build_bundle_artifacts
    from pairdots_server.influence.runtime import DIAGONAL_FILE

    split, full = pair
    cfg = ArtifactConfig(index_dim=16, low_rank=0, ekfac=False, diagonal=True, curvature=CFG)
    built = build_bundle_artifacts(split, cfg, tmp_path, progress=False)
    content = built.files[DIAGONAL_FILE]
    assert isinstance(content, bytes)
    got = _tensors(content)
    ref = _tensors(fit_diagonal_artifact(full, CFG, progress=False).content)
    assert float(ref["diag"].max()) > 0
    torch.testing.assert_close(got["diag"], ref["diag"], rtol=1e-4,
                               atol=1e-6 * float(ref["diag"].max()))
    torch.testing.assert_close(got["meta"], ref["meta"])
    info = built.manifest["curvature"]["diagonal"]
    assert info["num_examples"] == split.n_train and info["fisher"] == "empirical"


def test_texts_scored_against_many_s_tests(pair: tuple[ModelRuntime, ModelRuntime]) -> None:
    """pipeline.score_texts_many: -⟨s_j, ∇θL(z_i)⟩ for labelled texts against J s_tests at
    once, with and without the split, equals the loop reference gradient of each text through
    the whole model (core/grads.per_example_loss_grads_loop) dotted with each s_j."""
    from pairdots_server.core.grads import per_example_loss_grads_loop
    from pairdots_server.influence.pipeline import score_texts_many

    split, full = pair
    train = split.bundle.train
    texts = [train[i].text for i in (0, 3, 5)] + ["a short one", train[1].text + " again"]
    labels = [train[i].label for i in (0, 3, 5)] + [1, 0]
    s = torch.randn(3, split.num_params, generator=torch.Generator().manual_seed(2))
    s = s.to(next(iter(split.params.values())).dtype)
    ref = torch.zeros(len(texts), 3, dtype=torch.float64)
    for i, (text, y) in enumerate(zip(texts, labels, strict=True)):
        enc = full.task.encode([text], max_length=full.max_length)
        g = per_example_loss_grads_loop(full.task.logits_fn, full.params,
                                        full.task.embed(enc.input_ids).detach(),
                                        enc.attention_mask, torch.tensor([y]))  # [1,P]
        ref[i] = -(g.double() @ s.double().T)[0]
    for rt in (split, full):
        got = score_texts_many(rt, s, texts, labels, batch_size=2)  # [N,J]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # separate vectors, stacked once or (a stack budget of 2 rows) in groups per batch
    whole = score_texts_many(split, s, texts, labels, batch_size=2)
    for budget in (1 << 30, 2 * s.shape[1] * 8):
        listed = score_texts_many(split, list(s), texts, labels, batch_size=2,
                                  max_stack_bytes=budget)
        torch.testing.assert_close(listed, whole, rtol=1e-12, atol=0.0)
