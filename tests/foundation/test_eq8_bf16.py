"""Eq. 8 with the trunk in bfloat16 (TokenInfluence.EXACT_BF16, ScopeSplit.trunk_in) on a tiny
float32 bundle.

References, computed independently of pipeline.word_attributions:
- the trunk under bfloat16: every Linear's product rounded through bfloat16 by hand (inputs and
  weights cast, product accumulated in float32, as oneDNN does), the rest in float32 — h_L
  must match trunk_in(bfloat16) to 1e-5 of its largest value, and differ from the float32
  trunk (so bfloat16 did run);
- Eq. 8 totals: EXACT (float32) and EXACT_BF16 agree to bfloat16's precision — a total is a
  difference of two influences, so the error is relative to the influences, not the total:
  within 25 % of the example's largest |total| (1–13 % seen on this tiny model over 3 seeds;
  bench/eq8_precision.py measures it on minilm-sst2) — and are not identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.testing import make_tiny_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDX = [0, 5, 11, 17, 23]


@pytest.fixture(scope="module")
def rt32(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    root = tmp_path_factory.mktemp("eq8-bf16")
    make_tiny_bundle(root, "t32", n_train=32, finetune_steps=8, dtype=torch.float32)
    rt = ModelRuntime(load_bundle(Path(root) / "t32"))
    assert rt.split is not None and rt.task.dtype == torch.float32
    return rt


def _rounded_linears(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that replace every Linear's output by the bfloat16-operand product."""

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> torch.Tensor:
        assert isinstance(mod, nn.Linear)
        x = args[0].to(torch.bfloat16).float()
        w = mod.weight.to(torch.bfloat16).float()
        b = None if mod.bias is None else mod.bias.to(torch.bfloat16).float()
        return F.linear(x, w, b)

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]


def test_trunk_in_bfloat16_rounds_the_products(rt32: ModelRuntime) -> None:
    assert rt32.split is not None
    enc = rt32.encode_train(IDX)
    h32 = rt32.split.trunk(enc.embeds, enc.mask)
    h16 = rt32.split.trunk_in(torch.bfloat16)(enc.embeds, enc.mask)
    assert h16.dtype == torch.float32 and h16.shape == h32.shape
    handles = _rounded_linears(rt32.task.model)
    try:
        ref = rt32.split.trunk(enc.embeds, enc.mask)
    finally:
        for h in handles:
            h.remove()
    m = enc.mask.bool()
    scale = float(ref[m].abs().max())
    assert float((h16 - ref)[m].abs().max()) <= 2e-2 * scale  # output rounding of bf16 results
    assert float((h16 - h32)[m].abs().max()) > 1e-5 * scale  # bfloat16 ran
    assert rt32.split.trunk_in(None) == rt32.split.trunk
    assert rt32.split.trunk_in(torch.float32) == rt32.split.trunk


def test_exact_bf16_totals_agree_with_exact(rt32: ModelRuntime) -> None:
    g = torch.Generator().manual_seed(3)
    s_test = torch.randn(rt32.num_params, generator=g) / rt32.num_params**0.5
    ref = steps.word_attributions(rt32, s_test, IDX, steps.TokenInfluence.EXACT)
    low = steps.word_attributions(rt32, s_test, IDX, steps.TokenInfluence.EXACT_BF16)
    differs = False
    for a, b in zip(ref, low, strict=True):
        assert a.words == b.words and all(b.exact)
        scale = max(abs(v) for v in a.totals)
        assert scale > 0
        err = max(abs(x - y) for x, y in zip(a.totals, b.totals, strict=True))
        assert err <= 0.25 * scale
        differs |= err > 1e-7 * scale
    assert differs


def test_auto_resolves_by_device_and_dtype(
    rt32: ModelRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AUTO is EXACT_BF16 only for a float32 model with a scope split on a device with native
    bfloat16 products; EXACT_BF16 runs as EXACT where autocast cannot change anything (a
    float64 model), so the answer names what ran."""
    resolve, M = steps.resolve_token_influence, steps.TokenInfluence
    for native in (True, False):
        monkeypatch.setattr(steps, "native_bfloat16", lambda _device, n=native: n)
        assert resolve(rt32, M.AUTO) is (M.EXACT_BF16 if native else M.EXACT)
        assert resolve(rt32, M.EXACT_BF16) is M.EXACT_BF16
        assert resolve(rt32, M.EXACT) is M.EXACT and resolve(rt32, M.NONE) is M.NONE
    make_tiny_bundle(tmp_path, "t64", n_train=16, finetune_steps=2, dtype=torch.float64)
    rt64 = ModelRuntime(load_bundle(tmp_path / "t64"))
    monkeypatch.setattr(steps, "native_bfloat16", lambda _device: True)
    assert resolve(rt64, M.AUTO) is M.EXACT and resolve(rt64, M.EXACT_BF16) is M.EXACT
    monkeypatch.undo()
    # the real detection on this machine agrees with oneDNN's own check
    assert steps.native_bfloat16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
