"""Models by name and the torch/numpy edge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlearn.errors import ModelError, PayloadError
from fedlearn.models import MODELS, build_model, get_weights, set_weights


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (1, 28, 28)), ("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)),
                        ("cifar-cnn", (3, 32, 32))],
)
def test_models_fit_their_inputs(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 10)
    assert model(torch.zeros(4, *shape)).shape == (4, 10)


def test_mlp_is_the_seed_architecture() -> None:
    shapes = {k: v.shape for k, v in get_weights(build_model("mlp", (1, 28, 28))).items()}
    assert shapes == {
        "fc1.weight": (128, 784), "fc1.bias": (128,), "fc2.weight": (64, 128),
        "fc2.bias": (64,), "fc3.weight": (10, 64), "fc3.bias": (10,),
    }
    assert set(MODELS) == {"mlp", "cnn", "cifar-cnn"}


def test_misfit_and_unknown_models_name_both() -> None:
    with pytest.raises(ModelError, match=r"'cnn'.*\(1, 28, 28\).*\(3, 32, 32\)"):
        build_model("cnn", (3, 32, 32))
    with pytest.raises(ModelError, match="cifar-cnn"):
        build_model("cifar-cnn", (1, 28, 28))
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        build_model("resnet", (1, 28, 28))


def test_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = get_weights(build_model("mlp", (1, 28, 28), seed=7))
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = get_weights(build_model("mlp", (1, 28, 28), seed=7))
    c = get_weights(build_model("mlp", (1, 28, 28), seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


def test_set_weights_round_trip_and_refusals() -> None:
    model = build_model("mlp", (1, 8, 8))
    w = get_weights(model)
    w2 = {k: v + 1 for k, v in w.items()}
    set_weights(model, w2)
    assert np.allclose(get_weights(model)["fc1.bias"], w["fc1.bias"] + 1)
    with pytest.raises(PayloadError, match="missing"):
        set_weights(model, {k: v for k, v in w.items() if k != "fc1.bias"})
    bad = dict(w)
    bad["fc1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(PayloadError, match="shape"):
        set_weights(model, bad)
