import pytest
import torch

from pairdots_server.core.params import flatten, num_params, unflatten


def test_roundtrip_preserves_order_and_shapes() -> None:
    params = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0])}
    vec = flatten(params)
    assert num_params(params) == 8
    assert torch.equal(vec, torch.tensor([0.0, 1, 2, 3, 4, 5, 7, 8]))
    back = unflatten(vec * 2, params)
    assert list(back) == ["a", "b"]
    assert torch.equal(back["a"], params["a"] * 2)
    assert torch.equal(back["b"], params["b"] * 2)


def test_unflatten_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match="same parameter scope"):
        unflatten(torch.zeros(5), {"a": torch.zeros(2, 3)})
