"""K-FAC / EK-FAC (core.kfac_fit.fit_kfac, core.ihvp.kfac.EKFACSolver) against independent answers.

Model: the tiny float64 BERT of core_tiny (hidden 16, 2 layers), the last layer + pooler +
classifier scoped (8 Linear blocks, 4 LayerNorm tensors), 12 padded examples in batches of
5, 5, 2. Tolerances (float64):

* A, S vs per-token sums over explicitly captured activations / autograd output gradients of
  each example *without padding* (another capture path: hooks that add a zero ε to the layer
  output and differentiate w.r.t. ε): rtol 1e-9;
* EK-FAC Λ and the diagonal blocks vs per-example gradients from core.grads: rtol 1e-9; in
  "expected" mode also tr(Λ_l) and the LayerNorm diagonal vs the dense GGN of core_tiny: 1e-9;
* the solver vs torch.linalg.solve with the dense block-diagonal matrix (kron(S, A) for K-FAC,
  (Q_S⊗Q_A) diag(Λ) (Q_S⊗Q_A)ᵀ for EK-FAC, plus damping): relative error 1e-8;
* where the Kronecker structure is exact (a Linear classifier on one token, one example, or
  several examples sharing one input): K-FAC and EK-FAC equal the dense Fisher inverse, 1e-9;
* kronfluence 1.0.1 (if importable): A, S (rescaled by tokens/N), Λ and EK-FAC pairwise scores
  with its default heuristic damping: rtol 1e-10.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from core_tiny import explicit_ggn, make_logits_fn
from torch import Tensor, nn

from pairdots_server.core.batches import Batch, TensorBatches
from pairdots_server.core.exceptions import SolverError
from pairdots_server.core.grads import per_example_loss_grads, per_example_loss_grads_loop
from pairdots_server.core.ihvp.kfac import (
    EKFACSolver,
    KFACFactors,
    KFACSolver,
    heuristic_damping,
)
from pairdots_server.core.kfac_fit import fit_ekfac, fit_kfac
from pairdots_server.core.params import flatten, unflatten

N = 12
BATCH = 5


def batches_of(tiny, n: int = N, size: int = BATCH) -> list[Batch]:
    cuts = [slice(s, min(s + size, n)) for s in range(0, n, size)]
    return [Batch(tiny.embeds[c], tiny.mask[c], tiny.labels[c]) for c in cuts]


def sampled_labels(tiny, params, batches: list[Batch], seed: int = 0) -> Tensor:
    """The labels fit_kfac draws: one multinomial per batch from a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        with torch.no_grad():
            p = torch.softmax(tiny.logits_fn(params, b.embeds, b.mask), -1)
        out.append(torch.multinomial(p.double(), 1, replacement=True, generator=gen)[:, 0])
    return torch.cat(out)


def label_terms(tiny, params, fisher: str) -> list[tuple[Tensor, Tensor]]:
    """(labels [N], weights [N]) of the Fisher, computed here from the definition."""
    with torch.no_grad():
        p = torch.softmax(tiny.logits_fn(params, tiny.embeds[:N], tiny.mask[:N]), -1)  # [N,C]
    if fisher == "expected":
        return [(torch.full((N,), c), p[:, c]) for c in range(p.shape[1])]
    if fisher == "empirical":
        return [(tiny.labels[:N], torch.ones(N, dtype=torch.float64))]
    y = sampled_labels(tiny, params, batches_of(tiny))
    return [(y, torch.ones(N, dtype=torch.float64))]


def linear_names(model: nn.Module, params: Mapping[str, Tensor]) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in params
    ]


def per_token_reference(tiny, params, fisher: str) -> dict[str, tuple[Tensor, Tensor, int]]:
    """module -> (A, S, tokens) from each example run alone at its true length (no padding):
    a_t = the module input, δ_t = ∂L/∂ε for an ε = 0 added to the module output."""
    model = tiny.model
    names = linear_names(model, params)
    terms = label_terms(tiny, params, fisher)
    acc = {n: [0.0, 0.0, 0] for n in names}
    for i in range(N):
        length = tiny.lengths[i]
        e = tiny.embeds[i : i + 1, :length]
        m = torch.ones(1, length, dtype=torch.long)
        inputs: dict[str, Tensor] = {}
        eps: dict[str, Tensor] = {}
        handles = []
        for n in names:

            def hook(mod, inp, out, n=n, inputs=inputs, eps=eps):
                inputs[n] = inp[0].detach()
                eps[n] = torch.zeros_like(out, requires_grad=True)
                return out + eps[n]

            handles.append(model.get_submodule(n).register_forward_hook(hook))
        try:
            with torch.enable_grad():
                logits = tiny.logits_fn(params, e, m)  # [1,C]
                for y, w in terms:
                    loss = F.cross_entropy(logits, y[i : i + 1])
                    grads = torch.autograd.grad(loss, [eps[n] for n in names], retain_graph=True)
                    for n, g in zip(names, grads, strict=True):
                        d = g.reshape(-1, g.shape[-1])  # [T,O]
                        acc[n][1] = acc[n][1] + w[i] * d.T @ d
        finally:
            for h in handles:
                h.remove()
        for n in names:
            a = inputs[n].reshape(-1, inputs[n].shape[-1])  # [T,I]
            if f"{n}.bias" in params:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            acc[n][0] = acc[n][0] + a.T @ a
            acc[n][2] += a.shape[0]
    return {n: (a / t, s / N, t) for n, (a, s, t) in acc.items()}


@pytest.fixture(scope="module")
def params(tiny) -> dict[str, Tensor]:
    return tiny.scope("last_layer_head")


@pytest.fixture(scope="module")
def fitted(tiny, params) -> dict[str, KFACFactors]:
    return {
        f: fit_ekfac(tiny.model, params, tiny.logits_fn, batches_of(tiny), fisher=f)
        for f in ("expected", "empirical", "sampled")
    }


@pytest.mark.parametrize("fisher", ["expected", "empirical", "sampled"])
def test_factors_equal_per_token_sums_without_padding(tiny, params, fitted, fisher) -> None:
    factors = fitted[fisher]
    ref = per_token_reference(tiny, params, fisher)
    assert [lf.module for lf in factors.linear] == list(ref)
    assert len(factors.linear) == 8 and len(factors.diag) == 4
    for lf in factors.linear:
        a_ref, s_ref, tokens = ref[lf.module]
        assert lf.num_tokens == tokens  # attended tokens (sum of lengths) or N for [B,D] inputs
        torch.testing.assert_close(lf.activation_covariance(), a_ref, rtol=1e-9, atol=1e-12)
        scale = float(s_ref.abs().max())
        torch.testing.assert_close(lf.gradient_covariance(), s_ref, rtol=1e-9, atol=1e-9 * scale)
    assert factors.linear[0].num_tokens == sum(tiny.lengths[:N])
    assert factors.linear[-1].num_tokens == N


@pytest.mark.parametrize("fisher", ["expected", "empirical", "sampled"])
def test_ekfac_eigenvalues_are_mean_squared_projected_per_example_grads(
    tiny, params, fitted, fisher
) -> None:
    factors = fitted[fisher]
    lam_ref = {lf.module: 0.0 for lf in factors.linear}
    diag_ref = {k: 0.0 for k in factors.diag}
    for y, w in label_terms(tiny, params, fisher):
        g = per_example_loss_grads(tiny.logits_fn, params, tiny.embeds[:N], tiny.mask[:N], y)
        for lf in factors.linear:
            blocks = []
            for row in g:  # G_n = [∇W | ∇b] [O,I']
                parts = unflatten(row, params)
                blocks.append(torch.cat([parts[lf.weight_name], parts[lf.bias_name][:, None]], 1))
            gn = torch.stack(blocks)  # [N,O,I']
            rot = lf.q_s.T @ gn @ lf.q_a
            lam_ref[lf.module] = lam_ref[lf.module] + (w[:, None, None] * rot**2).mean(0)
        for k in factors.diag:
            gk = torch.stack([unflatten(row, params)[k] for row in g])
            diag_ref[k] = diag_ref[k] + (w.view(-1, *[1] * (gk.dim() - 1)) * gk**2).mean(0)
    for lf in factors.linear:
        scale = float(lam_ref[lf.module].abs().max())
        torch.testing.assert_close(lf.lam, lam_ref[lf.module], rtol=1e-9, atol=1e-9 * scale)
    for k, d in factors.diag.items():
        torch.testing.assert_close(d, diag_ref[k], rtol=1e-9, atol=1e-9 * float(d.abs().max()))


def test_expected_fisher_matches_the_dense_ggn_trace_and_diagonal(tiny, params, fitted) -> None:
    """Λ is the diagonal of the block Fisher in an orthonormal basis, so Σ Λ_l = tr(GGN_l); the
    diagonal blocks are the GGN diagonal itself ("expected" = exact true Fisher = GGN)."""
    factors = fitted["expected"]
    ggn_diag = torch.diagonal(explicit_ggn(tiny, params, N))
    where = unflatten(ggn_diag, params)
    for lf in factors.linear:
        tr = where[lf.weight_name].sum() + where[lf.bias_name].sum()
        torch.testing.assert_close(lf.lam.sum(), tr, rtol=1e-9, atol=0.0)
    for k, d in factors.diag.items():
        torch.testing.assert_close(d, where[k], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# solver vs dense block-diagonal matrix
# --------------------------------------------------------------------------------------------


def mixed_scope(tiny) -> dict[str, Tensor]:
    """Token Linear + LayerNorm, a Linear whose bias is not scoped, a bias whose weight is not
    scoped (diagonal block), pooler and classifier."""
    keep = (
        "bert.encoder.layer.1.attention.output.dense.weight",
        "bert.encoder.layer.1.attention.output.dense.bias",
        "bert.encoder.layer.1.attention.output.LayerNorm.weight",
        "bert.encoder.layer.1.attention.output.LayerNorm.bias",
        "bert.encoder.layer.1.intermediate.dense.weight",
        "bert.encoder.layer.1.output.dense.bias",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    )
    return {n: p.detach() for n, p in tiny.model.named_parameters() if n in keep}


def dense_block_matrix(
    factors: KFACFactors, params, ekfac: bool, damping: float | None
) -> tuple[Tensor, Tensor]:
    """(Ĥ + damping) [P,P] and Ĥ [P,P], assembled at the flat-θ positions of each block."""
    p = sum(t.numel() for t in params.values())
    pos = unflatten(torch.arange(p), params)
    h = torch.zeros(p, p, dtype=torch.float64)
    damp = torch.zeros(p, dtype=torch.float64)
    for lf in factors.linear:
        idx = pos[lf.weight_name]
        if lf.bias_name is not None:
            idx = torch.cat([idx, pos[lf.bias_name][:, None]], 1)
        idx = idx.reshape(-1)  # row-major vec of [O,I']
        if ekfac:
            k = torch.kron(lf.q_s, lf.q_a)
            blk = k @ torch.diag(lf.lam.reshape(-1)) @ k.T
            lam = lf.lam
        else:
            blk = torch.kron(lf.gradient_covariance(), lf.activation_covariance())
            lam = lf.eig_s[:, None] * lf.eig_a[None, :]
        h[idx[:, None], idx[None, :]] = blk
        damp[idx] = damping if damping is not None else 0.1 * float(lam.mean())
    for name, d in factors.diag.items():
        idx = pos[name].reshape(-1)
        h[idx, idx] = d.reshape(-1)
        damp[idx] = damping if damping is not None else 0.1 * float(d.mean())
    return h + torch.diag(damp), h


@pytest.mark.parametrize("ekfac", [True, False])
@pytest.mark.parametrize("damping", [1e-3, None])
def test_solver_equals_dense_block_diagonal_solve(tiny, ekfac, damping) -> None:
    params = mixed_scope(tiny)
    factors = fit_kfac(
        tiny.model,
        params,
        tiny.logits_fn,
        batches_of(tiny),
        fisher="sampled",
        eigen_correction=ekfac,
    )
    assert [(lf.module, lf.bias_name is not None) for lf in factors.linear] == [
        ("bert.encoder.layer.1.attention.output.dense", True),
        ("bert.encoder.layer.1.intermediate.dense", False),
        ("bert.pooler.dense", True),
        ("classifier", True),
    ]
    assert set(factors.diag) == {
        "bert.encoder.layer.1.attention.output.LayerNorm.weight",
        "bert.encoder.layer.1.attention.output.LayerNorm.bias",
        "bert.encoder.layer.1.output.dense.bias",
    }
    solver = EKFACSolver(factors, damping) if ekfac else KFACSolver(factors, damping)
    m, h = dense_block_matrix(factors, params, ekfac, damping)
    v = torch.randn(m.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = solver.solve(v)
    x_ref = torch.linalg.solve(m, v)
    assert float((res.x - x_ref).norm() / x_ref.norm()) <= 1e-8
    hv = solver.curvature_matvec(v)
    assert float((hv - h @ v).norm() / (h @ v).norm()) <= 1e-8
    d = res.diagnostics
    assert d.method == ("ekfac" if ekfac else "kfac") and d.converged
    if damping is None:
        assert d.damping_rule.startswith("heuristic: 0.1")
        assert len(d.block_damping) == len(factors.linear) + len(factors.diag)
        per_block = heuristic_damping(factors, ekfac)
        assert d.block_damping == per_block
        again = (EKFACSolver if ekfac else KFACSolver)(factors, per_block)
        assert again.damping_rule == "per-block" and torch.equal(again.solve(v).x, res.x)
    else:
        assert d.damping_rule == "absolute" and d.effective_damping == damping


# --------------------------------------------------------------------------------------------
# exact Kronecker structure
# --------------------------------------------------------------------------------------------


class LinearOnFirstToken(nn.Module):
    """logits = W e_0 + b: one Linear on the first token's embedding (one token per example)."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(d, c)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classifier(inputs_embeds[:, 0])


def linear_problem(same_input: bool, n: int):
    torch.manual_seed(3)
    model = LinearOnFirstToken(5, 3).double().eval().requires_grad_(False)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits_fn(p, e, m):
        return torch.func.functional_call(model, dict(p), (e, m))

    gen = torch.Generator().manual_seed(4)
    embeds = torch.randn(n, 3, 5, generator=gen, dtype=torch.float64)
    if same_input:
        embeds[:, 0] = embeds[0, 0]
    mask = torch.ones(n, 3, dtype=torch.long)
    labels = torch.tensor([0, 1, 2, 1, 0, 2][:n])
    return model, params, logits_fn, embeds, mask, labels


def dense_fisher(params, logits_fn, embeds, mask, labels, fisher: str) -> Tensor:
    """Expected: Σ_n Jᵀ(diag p - ppᵀ)J / N by autograd Jacobians; empirical: mean g gᵀ."""
    if fisher == "empirical":
        g = per_example_loss_grads_loop(logits_fn, params, embeds, mask, labels)
        return g.T @ g / g.shape[0]
    theta = flatten(params)
    jac = torch.autograd.functional.jacobian(
        lambda t: logits_fn(unflatten(t, params), embeds, mask), theta
    )  # [N,C,P]
    p = torch.softmax(logits_fn(params, embeds, mask), -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac) / embeds.shape[0]


@pytest.mark.parametrize(
    ("same_input", "n", "fisher"),
    [
        (False, 1, "expected"),
        (False, 1, "empirical"),
        (True, 4, "expected"),
        (True, 4, "empirical"),
    ],
)
def test_kfac_and_ekfac_are_exact_when_the_fisher_is_a_kronecker_product(
    same_input, n, fisher
) -> None:
    """One token per example and one input a for all examples: F = S ⊗ aaᵀ exactly."""
    model, params, logits_fn, embeds, mask, labels = linear_problem(same_input, n)
    fmat = dense_fisher(params, logits_fn, embeds, mask, labels, fisher)
    factors = fit_ekfac(model, params, logits_fn, [(embeds, mask, labels)], fisher=fisher)
    v = torch.randn(fmat.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    damping = 0.05
    x_ref = torch.linalg.solve(fmat + damping * torch.eye(fmat.shape[0], dtype=torch.float64), v)
    for solver in (EKFACSolver(factors, damping), KFACSolver(factors, damping)):
        x = solver.solve(v).x
        assert float((x - x_ref).norm() / x_ref.norm()) <= 1e-9, solver.method
        hv = solver.curvature_matvec(v)
        assert float((hv - fmat @ v).norm() / (fmat @ v).norm()) <= 1e-9, solver.method


def test_kfac_is_not_exact_for_distinct_inputs() -> None:
    """The exactness above is the structure's, not the test's: distinct inputs break it."""
    model, params, logits_fn, embeds, mask, labels = linear_problem(False, 4)
    fmat = dense_fisher(params, logits_fn, embeds, mask, labels, "expected")
    factors = fit_kfac(
        model,
        params,
        logits_fn,
        [(embeds, mask, labels)],
        fisher="expected",
        eigen_correction=False,
    )
    v = torch.randn(fmat.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hv = KFACSolver(factors, 0.05).curvature_matvec(v)
    assert float((hv - fmat @ v).norm() / (fmat @ v).norm()) > 1e-2


# --------------------------------------------------------------------------------------------
# storage, errors
# --------------------------------------------------------------------------------------------


def test_factors_roundtrip_through_safetensors(tiny, params, fitted, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    factors = fitted["sampled"]
    tensors = factors.to_tensors()
    save_file(tensors, str(tmp_path / "f.safetensors"))
    back = KFACFactors.from_tensors(load_file(str(tmp_path / "f.safetensors")))
    assert back.shapes == factors.shapes and back.fisher == "sampled" and back.num_examples == N
    v = torch.randn(
        back.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    assert torch.equal(EKFACSolver(back, None).solve(v).x, EKFACSolver(factors, None).solve(v).x)
    layout = sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if k in ("meta",) or k.startswith("shape/") or k.endswith("/info")
    )
    assert factors.num_bytes == sum(t.numel() * t.element_size() for t in tensors.values()) - layout
    with pytest.raises(SolverError, match="refit"):
        KFACFactors.from_tensors({k: t for k, t in tensors.items() if not k.endswith("/q_s")})


def test_errors(tiny, params) -> None:
    one_shot = iter(batches_of(tiny))
    with pytest.raises(SolverError, match="two passes"):
        fit_kfac(tiny.model, params, tiny.logits_fn, one_shot)
    factors = fit_kfac(
        tiny.model,
        params,
        tiny.logits_fn,
        TensorBatches(tiny.embeds[:4], tiny.mask[:4], tiny.labels[:4], batch_size=4),
        eigen_correction=False,
    )
    with pytest.raises(SolverError, match="eigen_correction"):
        EKFACSolver(factors, 1e-3)
    with pytest.raises(SolverError, match="damping > 0"):
        KFACSolver(factors, 0.0)  # 4 examples: S of the 16-wide layers is singular
    with pytest.raises(SolverError, match="damping"):
        KFACSolver(factors, -1.0)


# --------------------------------------------------------------------------------------------
# kronfluence
# --------------------------------------------------------------------------------------------


def test_matches_kronfluence(tiny, params, fitted, tmp_path) -> None:
    kf = pytest.importorskip(
        "kronfluence", reason="kronfluence is not installed (pip install kronfluence --no-deps)"
    )
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    factors = fitted["empirical"]
    modules = [lf.module for lf in factors.linear]

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"e": tiny.embeds[i], "m": tiny.mask[i], "y": tiny.labels[i]}

    class KTask(kf.Task):
        def compute_train_loss(self, batch, model, sample=False):
            assert not sample  # empirical Fisher: gold labels
            logits = model(inputs_embeds=batch["e"], attention_mask=batch["m"]).logits
            return F.cross_entropy(logits, batch["y"], reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["m"]

    task = KTask()
    model = prepare_model(copy.deepcopy(tiny.model), task)
    analyzer = Analyzer(
        "t",
        model,
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(tmp_path),
        log_level=logging.WARNING,
    )
    f64 = torch.float64
    fargs = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence's torch.cuda.amp notices
        analyzer.fit_all_factors(
            "f", Data(), per_device_batch_size=BATCH, factor_args=fargs, overwrite_output_dir=True
        )
    cov = analyzer.load_covariance_matrices("f")
    lam = analyzer.load_lambda_matrices("f")
    for lf in factors.linear:
        n = lf.module
        a = cov["activation_covariance"][n] / cov["num_activation_covariance_processed"][n]
        s = cov["gradient_covariance"][n] / cov["num_gradient_covariance_processed"][n]
        lam_kf = lam["lambda_matrix"][n] / lam["num_lambda_processed"][n]
        assert int(cov["num_activation_covariance_processed"][n]) == lf.num_tokens
        torch.testing.assert_close(lf.activation_covariance(), a, rtol=1e-10, atol=1e-13)
        # kronfluence divides S by the token count, we by the number of examples
        s_ours = s * lf.num_tokens / N
        torch.testing.assert_close(
            lf.gradient_covariance(), s_ours, rtol=1e-10, atol=1e-10 * float(s_ours.abs().max())
        )
        torch.testing.assert_close(
            lf.lam, lam_kf, rtol=1e-10, atol=1e-10 * float(lam_kf.abs().max())
        )

    # pairwise scores g_qᵀ (F̂ + λ)⁻¹ g_i over the Linear blocks, kronfluence's heuristic damping
    sargs = ScoreArguments(
        damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        analyzer.compute_pairwise_scores(
            "s",
            "f",
            Data(),
            Data(),
            per_device_query_batch_size=BATCH,
            per_device_train_batch_size=BATCH,
            score_args=sargs,
            overwrite_output_dir=True,
        )
    scores_kf = analyzer.load_pairwise_scores("s")["all_modules"]  # [N,N]
    g = per_example_loss_grads(
        tiny.logits_fn, params, tiny.embeds[:N], tiny.mask[:N], tiny.labels[:N]
    )
    pos = unflatten(torch.arange(g.shape[1]), params)
    lin = {lf.weight_name for lf in factors.linear} | {lf.bias_name for lf in factors.linear}
    keep = torch.cat([pos[k].reshape(-1) for k in params if k in lin])
    solver = EKFACSolver(factors, None)
    x = torch.stack([solver.solve(row).x for row in g])
    ours = g[:, keep] @ x[:, keep].T
    torch.testing.assert_close(ours, scores_kf, rtol=1e-10, atol=1e-10 * float(ours.abs().max()))


def test_float32_products_match_the_float64_fit(tiny, params, fitted) -> None:
    """A float32 model computes aᵀa, δᵀδ and the rotated gradients in float32 (sums in
    float64): the eigenvalues Λ and the Kronecker eigenvalues stay within 1e-4 of the float64
    fit of the same model."""
    model32 = copy.deepcopy(tiny.model).float()
    names = dict(model32.named_parameters())
    p32 = {k: names[k].detach() for k in params}
    b32 = [Batch(b.embeds.float(), b.mask, b.labels) for b in batches_of(tiny)]

    got = fit_ekfac(model32, p32, make_logits_fn(model32), b32, fisher="expected")
    ref = fitted["expected"]
    for g, r in zip(got.linear, ref.linear, strict=True):
        assert g.module == r.module and g.lam.dtype == torch.float32
        scale = float(r.lam.abs().max())
        torch.testing.assert_close(g.lam.double(), r.lam, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(g.eig_a.double(), r.eig_a, rtol=1e-4,
                                   atol=1e-5 * float(r.eig_a.abs().max()))
