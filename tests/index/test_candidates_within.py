"""pipeline.candidates with `allowed` (the "examples containing the word" mode): the top K of
each direction among the allowed examples by the index's projected score — checked against a
full search of the same index (every stored example's score), filtered and ranked here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pairdots_server.influence import pipeline as steps
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.settings import InfluenceSettings
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.testing import make_tiny_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    root = make_tiny_root(tmp_path_factory.mktemp("within"))
    return ModelRuntime(load_bundle(Path(root) / "tiny"))


@pytest.mark.parametrize("k,count", [(4, 40), (6, 13)])
def test_candidates_within_allowed_are_the_top_k_each_way(
    rt: ModelRuntime, k: int, count: int
) -> None:
    assert rt.has_index and rt.n_train == 64
    settings = InfluenceSettings(use_index=True).resolve(rt, default_candidates=k)
    assert settings.candidates == k and 2 * k < count
    s = torch.randn(rt.num_params, generator=torch.Generator().manual_seed(count))
    s = s.to(next(iter(rt.params.values())).dtype)
    allowed = sorted(np.random.default_rng(count).choice(rt.n_train, size=count, replace=False))
    got = steps.candidates(rt, s, settings, allowed=[int(i) for i in allowed])
    index, projection = rt.index()
    q = projection.project(s[None].float()).cpu().numpy()  # [1, k]
    want: set[int] = set()
    keep = {int(a) for a in allowed}
    for sign in (-1.0, 1.0):
        _, ids = index.search(sign * q, rt.n_train)  # every stored example, ranked
        ranked = [int(i) for i in ids[0] if int(i) in keep]
        want |= set(ranked[:k])
    assert got == sorted(want)
    assert len(got) <= 2 * k and set(got) <= keep
