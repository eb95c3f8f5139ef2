"""The sample models: each builds a graph the server accepts, in float32 and float64,
with finite outputs and gradients shaped like their inputs; on tiny float64 versions
the gradients match centered differences (remat.gradcheck)."""

from __future__ import annotations

import numpy as np
import pytest

import remat
from remat import models

# Small but not degenerate: every axis distinct where possible, so a transposed
# gradient cannot pass a shape check by accident.
SMALL = {
    "mlp": lambda dtype: models.mlp(batch=8, widths=(6, 10, 7, 4), dtype=dtype),
    "transformer_block": lambda dtype: models.transformer_block(
        batch=2, seq=5, d_model=12, heads=3, d_ff=20, dtype=dtype
    ),
    "cnn": lambda dtype: models.cnn(batch=3, channels=(2, 4, 5), image=8, classes=6, dtype=dtype),
    "logistic_regression": lambda dtype: models.logistic_regression(
        batch=9, features=5, dtype=dtype
    ),
    "svm_weston_watkins": lambda dtype: models.svm(batch=9, features=5, classes=4, dtype=dtype),
    "svm_crammer_singer": lambda dtype: models.svm(
        batch=9, features=5, classes=4, dtype=dtype, variant="crammer_singer"
    ),
}

# Tiny float64 versions for centered differences (two server calls per element).
TINY = {
    "mlp": lambda: models.mlp(batch=3, widths=(3, 4, 3), dtype="float64", l2=0.1),
    "transformer_block": lambda: models.transformer_block(
        batch=1, seq=3, d_model=4, heads=2, d_ff=5, dtype="float64"
    ),
    "cnn": lambda: models.cnn(batch=2, channels=(1, 2), image=4, classes=3, dtype="float64"),
    "logistic_regression": lambda: models.logistic_regression(
        batch=5, features=3, dtype="float64", l2=0.1
    ),
    "svm_weston_watkins": lambda: models.svm(
        batch=6, features=3, classes=4, dtype="float64", l2=0.1
    ),
    "svm_crammer_singer": lambda: models.svm(
        batch=6, features=3, classes=4, dtype="float64", l2=0.1, variant="crammer_singer"
    ),
}


@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_builder_runs_with_finite_outputs_and_input_shaped_grads(client, name, dtype):
    model = SMALL[name](dtype)
    assert model.loss in model.graph.output_names
    assert model.wrt and set(model.wrt) <= set(model.inputs)
    declared = {item.name: (item.shape, item.dtype) for item in model.graph.inputs}
    assert declared == {k: (v.shape, v.dtype.name) for k, v in model.inputs.items()}

    result = client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss)

    loss = result.outputs[model.loss]
    assert loss.shape == () and loss.dtype == np.dtype(dtype)
    assert all(np.all(np.isfinite(value)) for value in result.outputs.values())
    assert not result.warnings
    assert sorted(result.grads) == sorted(model.wrt)
    for input_name, grad in result.grads.items():
        assert grad.shape == model.inputs[input_name].shape, input_name
        assert grad.dtype == np.dtype(dtype), input_name
        assert np.all(np.isfinite(grad)), input_name
    assert any(np.any(grad != 0) for grad in result.grads.values())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_builders_are_deterministic(name):
    first, second = SMALL[name]("float64"), SMALL[name]("float64")
    assert first.graph.to_proto() == second.graph.to_proto()
    assert first.inputs.keys() == second.inputs.keys()
    for key in first.inputs:
        np.testing.assert_array_equal(first.inputs[key], second.inputs[key])


@pytest.mark.parametrize("name", sorted(TINY))
def test_gradcheck_tiny_float64(client, name):
    model = TINY[name]()
    rng = np.random.default_rng(3)
    # Move parameters off their init (unit layer-norm weights, zero biases).
    inputs = {
        k: v + 0.1 * rng.standard_normal(v.shape) if k in model.wrt else v
        for k, v in model.inputs.items()
    }
    report = remat.gradcheck(client, model.graph, inputs, wrt=model.wrt, loss=model.loss)
    assert set(report) == set(model.wrt)
    worst = max(report, key=report.get)
    assert report[worst] <= 1e-6, (
        f"{name}: gradient of {worst} has relative error {report[worst]:.3g}"
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: models.transformer_block(d_model=10, heads=4), "multiple of heads"),
        (lambda: models.cnn(channels=(3, 4, 4, 4), image=12), "divisible"),
        (lambda: models.svm(variant="ovr"), "variant"),
    ],
)
def test_builders_reject_inconsistent_sizes(call, message):
    with pytest.raises(ValueError, match=message):
        call()
