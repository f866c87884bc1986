"""EK-FAC / diagonal / identity solvers through the registry on a tiny bundle, the curvature
artifacts (prepare, `pairdots curvature fit`, crash safety), Model.has_ekfac/has_diagonal and
the low-rank tail in the solver diagnostics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pairdots_server.cli.main import main
from pairdots_server.core.grads import per_example_loss_grads
from pairdots_server.core.ihvp.diagonal import DiagonalFactors
from pairdots_server.core.ihvp.kfac import EKFACSolver, KFACFactors, heuristic_damping
from pairdots_server.core.ihvp.lowrank import LowRankFactors, LowRankSolver
from pairdots_server.errors import FailedPrecondition
from pairdots_server.influence import artifacts
from pairdots_server.influence.artifacts import (
    CurvatureConfig,
    add_curvature,
    fit_lowrank_artifact,
)
from pairdots_server.influence.runtime import (
    DIAGONAL_FILE,
    EKFAC_FILE,
    LOWRANK_FILE,
    ModelRuntime,
)
from pairdots_server.influence.solver_policy import (
    SolverChoice,
    SolverSettings,
    default_method,
    resolve_method,
    solve_s_test,
    solver_warnings,
)
from pairdots_server.storage import update as update_mod
from pairdots_server.storage.bundle import load_bundle, verify_bundle
from pairdots_server.storage.data import Example
from pairdots_server.storage.update import update_bundle
from pairdots_server.testing import synthetic_examples

CFG = CurvatureConfig(batch_size=8)


def _stop() -> None:
    return None


def _copy(root: Path, dest: Path, name: str = "tiny") -> Path:
    out = dest / name
    shutil.copytree(root / "tiny", out)
    return out


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fitted(tiny_bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle with EK-FAC, diagonal and low-rank artifacts."""
    path = _copy(tiny_bundle_root, tmp_path_factory.mktemp("fitted"))
    rt = ModelRuntime(load_bundle(path))
    add_curvature(path, rt, ["ekfac", "diagonal"], CFG, progress=False)
    low = fit_lowrank_artifact(rt, 4, progress=False)
    update_bundle(path, {low.relpath: low.content}, {"curvature": {"lowrank": low.info}})
    return path


@pytest.fixture(scope="module")
def rt(fitted: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(fitted))


def _v(rt: ModelRuntime, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rt.num_params, generator=g).to(next(iter(rt.params.values())).dtype)


# -- the registry against the core solvers built by hand -------------------------------------


def test_ekfac_through_registry_equals_core_solver_from_stored_factors(
    rt: ModelRuntime, fitted: Path
) -> None:
    v = _v(rt)
    x, diag = solve_s_test(rt, v, SolverSettings(method=SolverChoice.EKFAC), _stop)
    factors = KFACFactors.from_tensors(load_file(str(fitted / EKFAC_FILE)))
    assert factors.num_examples == rt.n_train  # the whole training set
    ref = EKFACSolver(factors, None).solve(v)
    torch.testing.assert_close(x, ref.x, rtol=1e-6, atol=1e-8)
    assert diag["method"] == "ekfac" and diag["fisher"] == "sampled"
    assert diag["damping_rule"].startswith("heuristic: 0.1")
    lam = heuristic_damping(factors, True)
    assert diag["effective_damping"] == pytest.approx(ref.diagnostics.effective_damping)
    assert min(lam.values()) <= diag["effective_damping"] <= max(lam.values())
    # an absolute request damping reaches the solver
    x2, d2 = solve_s_test(rt, v, SolverSettings(method=SolverChoice.EKFAC, damping=0.5), _stop)
    torch.testing.assert_close(x2, EKFACSolver(factors, 0.5).solve(v).x, rtol=1e-6, atol=1e-8)
    assert d2["effective_damping"] == 0.5 and d2["damping_rule"] == "absolute"


def test_diagonal_through_registry_is_v_over_d_plus_heuristic(
    rt: ModelRuntime, fitted: Path
) -> None:
    v = _v(rt, 1)
    x, diag = solve_s_test(rt, v, SolverSettings(method=SolverChoice.DIAGONAL), _stop)
    f = DiagonalFactors.from_tensors(load_file(str(fitted / DIAGONAL_FILE)))
    lam = 0.1 * float(f.diag.mean())
    torch.testing.assert_close(x, v / (f.diag.to(v.dtype) + lam), rtol=1e-6, atol=1e-8)
    assert diag["method"] == "diagonal" and diag["effective_damping"] == pytest.approx(lam)
    assert "mean(d)" in diag["damping_rule"] and diag["fisher"] == "empirical"
    # fitted over every training example: d = mean of the squared per-example gradients
    enc = rt.encode_train(list(range(rt.n_train)))
    g = per_example_loss_grads(rt.task.logits_fn, rt.params, enc.embeds, enc.mask, enc.labels)
    torch.testing.assert_close(f.diag, (g**2).mean(0).to(f.diag.dtype), rtol=1e-3, atol=1e-9)
    assert f.num_examples == rt.n_train


def test_identity_through_registry(rt: ModelRuntime) -> None:
    v = _v(rt, 2)
    x, diag = solve_s_test(rt, v, SolverSettings(method=SolverChoice.IDENTITY), _stop)
    assert torch.equal(x, v) and diag["effective_damping"] == 1.0
    assert diag["method"] == "identity" and "plain gradient" in diag["damping_rule"]
    x, diag = solve_s_test(rt, v, SolverSettings(method=SolverChoice.IDENTITY, damping=4.0),
                           _stop)
    torch.testing.assert_close(x, v / 4.0)
    assert diag["effective_damping"] == 4.0


def test_lowrank_through_registry_reports_the_tail(rt: ModelRuntime, fitted: Path) -> None:
    v = _v(rt, 3)
    x, diag = solve_s_test(rt, v, SolverSettings(method=SolverChoice.LOW_RANK), _stop)
    f = LowRankFactors.from_tensors(load_file(str(fitted / LOWRANK_FILE)))
    delta = 0.01 * float(f.eigvals.max())
    torch.testing.assert_close(x, LowRankSolver(f, delta).solve(v).x, rtol=1e-6, atol=1e-8)
    assert f.next_eigval is not None and f.max_residual is not None
    assert diag["lowrank_next_eigval"] == pytest.approx(f.next_eigval)
    assert diag["lowrank_tail_ratio"] == pytest.approx(max(f.next_eigval, 0) / delta)
    assert diag["lowrank_max_residual"] == pytest.approx(f.max_residual)
    info = json.loads((fitted / "manifest.json").read_text())["curvature"]["lowrank"]
    assert info["rank"] == 4 and info["next_eigval"] == pytest.approx(f.next_eigval)
    # δ far below λ_{k+1} warns; far above does not
    _, d_small = solve_s_test(
        rt, v, SolverSettings(method=SolverChoice.LOW_RANK, damping=f.next_eigval / 100), _stop
    )
    assert any("λ_{k+1}/δ" in w for w in solver_warnings(d_small))
    _, d_big = solve_s_test(
        rt, v, SolverSettings(method=SolverChoice.LOW_RANK, damping=f.next_eigval * 100), _stop
    )
    assert not any("λ_{k+1}/δ" in w for w in solver_warnings(d_big))


def test_old_lowrank_without_tail_reports_unknown(rt: ModelRuntime, fitted: Path,
                                                  tmp_path: Path) -> None:
    from safetensors.torch import save

    path = tmp_path / "old"
    shutil.copytree(fitted, path)
    t = load_file(str(fitted / LOWRANK_FILE))
    update_bundle(path, {LOWRANK_FILE: save({"eigvals": t["eigvals"], "eigvecs": t["eigvecs"]})})
    old = ModelRuntime(load_bundle(path))
    _, diag = solve_s_test(old, _v(old), SolverSettings(method=SolverChoice.LOW_RANK), _stop)
    assert diag["lowrank_tail_ratio"] == "unknown" and diag["lowrank_max_residual"] == "unknown"
    assert solver_warnings(diag) == []


# -- missing artifacts, defaults, Model ------------------------------------------------------


def test_missing_artifact_is_failed_precondition_naming_the_command(
    tiny_bundle_root: Path
) -> None:
    bare = ModelRuntime(load_bundle(tiny_bundle_root / "tiny"))
    assert not bare.has_ekfac and not bare.has_diagonal
    for method, kind in ((SolverChoice.EKFAC, "ekfac"), (SolverChoice.DIAGONAL, "diagonal")):
        with pytest.raises(FailedPrecondition) as err:
            solve_s_test(bare, _v(bare), SolverSettings(method=method), _stop)
        assert f"`pairdots curvature fit --bundle {bare.bundle.path} --kind {kind}`" \
            in err.value.message
        with pytest.raises(FailedPrecondition):
            resolve_method(bare, SolverSettings(method=method))
    # identity needs nothing
    resolve_method(bare, SolverSettings(method=SolverChoice.IDENTITY))


def test_default_method_and_model_message(rt: ModelRuntime, fitted: Path, tmp_path: Path,
                                          tiny_bundle_root: Path) -> None:
    from pairdots.v1 import pairdots_pb2 as pb
    from pairdots_server.rpc.convert import model_proto
    from pairdots_server.rpc.validation import SOLVERS

    assert SOLVERS[pb.SOLVER_EKFAC] is SolverChoice.EKFAC
    assert SOLVERS[pb.SOLVER_DIAGONAL] is SolverChoice.DIAGONAL
    assert SOLVERS[pb.SOLVER_IDENTITY] is SolverChoice.IDENTITY
    m = model_proto(rt)
    assert m.has_ekfac and m.has_diagonal and m.has_low_rank
    # the measured default (solver_policy.DEFAULT_METHOD_ORDER): the diagonal Fisher first
    assert m.default_solver == pb.SOLVER_DIAGONAL and default_method(rt) is SolverChoice.DIAGONAL
    bare = ModelRuntime(load_bundle(tiny_bundle_root / "tiny"))
    mb = model_proto(bare)
    assert not mb.has_ekfac and not mb.has_diagonal and mb.default_solver == pb.SOLVER_LISSA
    # a bundle declaring EK-FAC its default
    path = tmp_path / "declared"
    shutil.copytree(fitted, path)
    update_bundle(path, {}, {"defaults": {"solver": "ekfac"}})
    declared = ModelRuntime(load_bundle(path))
    assert default_method(declared) is SolverChoice.EKFAC
    assert model_proto(declared).default_solver == pb.SOLVER_EKFAC
    _, diag = solve_s_test(declared, _v(declared), SolverSettings(), _stop)
    assert diag["method"] == "ekfac"
    # declared but missing artifact: the automatic rule
    bare_decl = tmp_path / "bare-declared"
    shutil.copytree(tiny_bundle_root / "tiny", bare_decl)
    update_bundle(bare_decl, {}, {"defaults": {"solver": "ekfac"}})
    assert default_method(ModelRuntime(load_bundle(bare_decl))) is SolverChoice.LISSA


# -- prepare and `pairdots curvature fit` ----------------------------------------------------


def _tsv(path: Path, exs: list[Example]) -> Path:
    path.write_text("".join(f"{e.text}\t{e.label}\n" for e in exs), encoding="utf-8")
    return path


def _prepare(tiny_dir: Path, tmp_path: Path, name: str, *flags: str) -> Path:
    train = _tsv(tmp_path / "train.tsv", synthetic_examples(20, seed=1))
    rc = main([
        "prepare", "--model", str(tiny_dir), "--train", str(train), "--dev", "",
        "--name", name, "--out", str(tmp_path / "bundles"), "--no-index", "--low-rank", "3",
        "--max-steps", "2", "--batch-size", "8", "--max-length", "32",
        "--curvature-batch-size", "8", "--quiet", *flags,
    ])
    assert rc == 0
    return tmp_path / "bundles" / name


def test_prepare_fits_verified_curvature_artifacts(tiny_dir: Path, tmp_path: Path) -> None:
    path = _prepare(tiny_dir, tmp_path, "prep", "--default-solver", "ekfac")
    m = verify_bundle(path)
    for rel in (EKFAC_FILE, DIAGONAL_FILE, LOWRANK_FILE):
        assert rel in m["files"]
    for kind, rel in (("ekfac", EKFAC_FILE), ("diagonal", DIAGONAL_FILE)):
        info = m["curvature"][kind]
        assert info["file"] == rel and info["bytes"] == (path / rel).stat().st_size
        assert info["seconds"] >= 0 and info["num_examples"] == 20
    assert m["defaults"]["solver"] == "ekfac"
    b = ModelRuntime(load_bundle(path))  # verifies every hash
    assert b.has_ekfac and b.has_diagonal and b.ekfac().num_examples == 20
    assert default_method(b) is SolverChoice.EKFAC


def test_curvature_fit_adds_artifacts_and_failure_leaves_bundle_unchanged(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _prepare(tiny_dir, tmp_path, "bare", "--no-ekfac", "--no-diagonal")
    m0 = verify_bundle(path)
    assert EKFAC_FILE not in m0["files"] and DIAGONAL_FILE not in m0["files"]
    before = _snapshot(path)

    # 1. the second fit fails: nothing written, the bundle verifies
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("diagonal fit failed (simulated)")

    monkeypatch.setitem(artifacts.FITTERS, "diagonal", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["curvature", "fit", "--bundle", str(path), "--batch-size", "8"])
    assert _snapshot(path) == before
    verify_bundle(path)
    monkeypatch.undo()

    # 2. a failure while installing the staged files: manifest restored, no temp files left
    real = update_mod.os.replace

    def flaky(src: object, dst: object) -> None:
        if str(dst).endswith(DIAGONAL_FILE):  # installing the second file fails
            raise OSError("disk went away (simulated)")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(update_mod.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        main(["curvature", "fit", "--bundle", str(path), "--batch-size", "8", "--quiet"])
    monkeypatch.undo()
    assert verify_bundle(path)["files"] == m0["files"]
    assert not [p for p in path.rglob("*.tmp")] and not [p for p in path.rglob("*.bak")]

    # 3. success: both added, the old files untouched, everything verifies
    capsys.readouterr()
    rc = main(["curvature", "fit", "--bundle", str(path), "--kind", "ekfac,diagonal",
               "--batch-size", "8"])
    assert rc == 0
    out = capsys.readouterr()
    assert "ekfac: ekfac.safetensors" in out.out and "bundle updated and verified" in out.out
    assert "batches" in out.err  # progress
    m1 = verify_bundle(path)
    assert {k: v for k, v in m1["files"].items() if k in m0["files"]} == m0["files"]
    assert m1["curvature"]["ekfac"]["num_examples"] == 20
    assert m1["curvature"]["lowrank"] == m0["curvature"]["lowrank"]
    r = ModelRuntime(load_bundle(path))
    assert r.has_ekfac and r.has_diagonal

    # 4. a failed refit keeps the existing factors
    after = _snapshot(path)
    monkeypatch.setitem(artifacts.FITTERS, "ekfac", boom)
    with pytest.raises(RuntimeError):
        main(["curvature", "fit", "--bundle", str(path), "--kind", "ekfac", "--quiet"])
    assert _snapshot(path) == after
    verify_bundle(path)
    monkeypatch.undo()

    # 5. a refit that fails while replacing the second file: the old files and manifest are
    # put back (the first, already replaced, file included)
    monkeypatch.setattr(update_mod.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        main(["curvature", "fit", "--bundle", str(path), "--seed", "1", "--quiet"])
    monkeypatch.undo()
    assert _snapshot(path) == after
    verify_bundle(path)
