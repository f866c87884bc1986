"""K-FAC / EK-FAC factors and their storage: per Linear block the Kronecker factors A and S with
their eigenbases (and the EK-FAC eigenvalues), per other scoped parameter a diagonal block,
and the flat tensor dict a bundle stores them as (to_tensors / from_tensors). The factors are
fitted by ``core.kfac_fit.fit_kfac``; the math that uses them is in ``core.ihvp.kfac``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pairdots_server.core.exceptions import SolverError

FISHER_KINDS = ("sampled", "expected", "empirical")
HEURISTIC_DAMPING_SCALE = 0.1  # kronfluence's HEURISTIC_DAMPING_SCALE


@dataclass(frozen=True)
class LinearFactors:
    """The K-FAC / EK-FAC factors of one ``nn.Linear`` block.

    module: the module's name in ``model.named_modules()``; weight_name / bias_name: the scoped
    parameter names (bias_name None when the bias is not scoped; then I' = I, no 1 appended).
    q_a [I',I'], eig_a [I']: eigendecomposition of A; q_s [O,O], eig_s [O]: of S (ascending,
    as torch.linalg.eigh returns them). lam [O,I'] or None: the EK-FAC eigenvalues.
    num_tokens: the attended tokens behind A.
    """

    module: str
    weight_name: str
    bias_name: str | None
    q_a: Tensor
    eig_a: Tensor
    q_s: Tensor
    eig_s: Tensor
    lam: Tensor | None
    num_tokens: int

    @property
    def d_out(self) -> int:
        return int(self.q_s.shape[0])

    @property
    def d_in(self) -> int:
        """I' (the input width, plus one for a scoped bias)."""
        return int(self.q_a.shape[0])

    def activation_covariance(self) -> Tensor:
        """A = Q_A diag(λ_A) Q_Aᵀ [I',I']."""
        return (self.q_a * self.eig_a) @ self.q_a.T

    def gradient_covariance(self) -> Tensor:
        """S = Q_S diag(λ_S) Q_Sᵀ [O,O]."""
        return (self.q_s * self.eig_s) @ self.q_s.T

    def kfac_eigenvalues(self) -> Tensor:
        """λ_S ⊗ λ_A as an [O,I'] matrix, clamped at 0 (eigh may return -1e-17 for a PSD A)."""
        return (self.eig_s[:, None] * self.eig_a[None, :]).clamp_min(0.0)

    def eigenvalues(self, ekfac: bool) -> Tensor:
        """Λ [O,I'] of the block: EK-FAC's corrected ones or K-FAC's λ_S ⊗ λ_A."""
        if ekfac:
            if self.lam is None:
                raise SolverError(
                    f"layer {self.module!r} has no EK-FAC eigenvalues (fitted with "
                    "eigen_correction=False); refit with eigen_correction=True or use K-FAC"
                )
            return self.lam
        return self.kfac_eigenvalues()


@dataclass(frozen=True)
class KFACFactors:
    """Block-diagonal K-FAC / EK-FAC factors covering every scoped parameter.

    shapes: the scoped parameters in flat-θ order (``core.params.flatten`` of the scope dict);
    linear: one ``LinearFactors`` per Kronecker block; diag: name -> mean squared per-example
    gradient (shaped like the parameter) for every parameter not in a Linear block.
    fisher: "sampled" | "expected" | "empirical"; num_examples: N behind S, Λ and d.
    """

    shapes: dict[str, tuple[int, ...]]
    linear: list[LinearFactors]
    diag: dict[str, Tensor]
    fisher: str
    num_examples: int
    num_samples: int = 1
    stats: dict[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        covered: list[str] = list(self.diag)
        for lf in self.linear:
            covered.append(lf.weight_name)
            if lf.bias_name is not None:
                covered.append(lf.bias_name)
            shape = self.shapes.get(lf.weight_name, ())
            bias = 1 if lf.bias_name is not None else 0
            if len(shape) != 2 or (shape[0], shape[1] + bias) != (lf.d_out, lf.d_in):
                raise SolverError(
                    f"layer {lf.module!r}: factors are [{lf.d_out}x{lf.d_out}] x "
                    f"[{lf.d_in}x{lf.d_in}] but the weight {lf.weight_name!r} has shape "
                    f"{self.shapes.get(lf.weight_name)}; the stored factors are inconsistent"
                )
        if sorted(covered) != sorted(self.shapes) or len(set(covered)) != len(covered):
            raise SolverError(
                "K-FAC factors do not cover each scoped parameter exactly once "
                f"(missing {sorted(set(self.shapes) - set(covered))}, extra "
                f"{sorted(set(covered) - set(self.shapes))}); refit them for this scope"
            )
        if self.fisher not in FISHER_KINDS:
            raise SolverError(f"unknown fisher kind {self.fisher!r}; use one of {FISHER_KINDS}")

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def has_ekfac(self) -> bool:
        return all(lf.lam is not None for lf in self.linear)

    @property
    def num_bytes(self) -> int:
        """Bytes held by the factor tensors (what ``to_tensors`` stores, layout excluded)."""
        total = sum(t.numel() * t.element_size() for t in self.diag.values())
        for lf in self.linear:
            for t in (lf.q_a, lf.eig_a, lf.q_s, lf.eig_s, lf.lam):
                if t is not None:
                    total += t.numel() * t.element_size()
        return int(total)

    # -- safetensors-friendly storage ---------------------------------------------------------

    def to_tensors(self) -> dict[str, Tensor]:
        """A flat name -> tensor dict (contiguous, int64 for the layout) for safetensors.

        Keys: ``meta`` [fisher code, N, num_samples]; ``shape/<idx>/<param>`` (the layout, in
        flat-θ order); ``diag/<param>``; ``linear/<module>/{q_a,eig_a,q_s,eig_s,lam,info}`` with
        info = [has_bias, num_tokens]. Parameter names are HF dotted names (no '/').
        """
        out: dict[str, Tensor] = {
            "meta": torch.tensor(
                [FISHER_KINDS.index(self.fisher), self.num_examples, self.num_samples],
                dtype=torch.int64,
            )
        }
        for idx, (name, shape) in enumerate(self.shapes.items()):
            out[f"shape/{idx:06d}/{name}"] = torch.tensor(list(shape), dtype=torch.int64)
        for name, d in self.diag.items():
            out[f"diag/{name}"] = d.contiguous()
        for lf in self.linear:
            pre = f"linear/{lf.module}/"
            out[pre + "q_a"] = lf.q_a.contiguous()
            out[pre + "eig_a"] = lf.eig_a.contiguous()
            out[pre + "q_s"] = lf.q_s.contiguous()
            out[pre + "eig_s"] = lf.eig_s.contiguous()
            if lf.lam is not None:
                out[pre + "lam"] = lf.lam.contiguous()
            out[pre + "info"] = torch.tensor(
                [int(lf.bias_name is not None), lf.num_tokens], dtype=torch.int64
            )
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> KFACFactors:
        if "meta" not in tensors:
            raise SolverError("K-FAC factors are missing 'meta'; refit the curvature (fit_kfac)")
        code, n, k = (int(x) for x in tensors["meta"].tolist())
        shapes_idx = []
        for key, t in tensors.items():
            if key.startswith("shape/"):
                _, idx, name = key.split("/", 2)
                shapes_idx.append((int(idx), name, tuple(int(s) for s in t.tolist())))
        shapes = {name: shape for _, name, shape in sorted(shapes_idx)}
        diag = {key[len("diag/") :]: t for key, t in tensors.items() if key.startswith("diag/")}
        modules = sorted(
            {
                key[len("linear/") :].rsplit("/", 1)[0]
                for key in tensors
                if key.startswith("linear/")
            }
        )
        linear = []
        for mod in modules:
            pre = f"linear/{mod}/"
            missing = {"q_a", "eig_a", "q_s", "eig_s", "info"} - {
                key[len(pre) :] for key in tensors if key.startswith(pre)
            }
            if missing:
                raise SolverError(
                    f"K-FAC factors of layer {mod!r} are missing {sorted(missing)}; refit them"
                )
            has_bias, num_tokens = (int(x) for x in tensors[pre + "info"].tolist())
            linear.append(
                LinearFactors(
                    module=mod,
                    weight_name=f"{mod}.weight",
                    bias_name=f"{mod}.bias" if has_bias else None,
                    q_a=tensors[pre + "q_a"],
                    eig_a=tensors[pre + "eig_a"],
                    q_s=tensors[pre + "q_s"],
                    eig_s=tensors[pre + "eig_s"],
                    lam=tensors.get(pre + "lam"),
                    num_tokens=num_tokens,
                )
            )
        # keep the blocks in flat-θ order of their weights
        order = {name: i for i, name in enumerate(shapes)}
        linear.sort(key=lambda lf: order.get(lf.weight_name, -1))
        return cls(
            shapes=shapes,
            linear=linear,
            diag=diag,
            fisher=FISHER_KINDS[code],
            num_examples=n,
            num_samples=k,
        )
