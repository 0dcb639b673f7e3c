"""Every public function checks its arguments: the exception type, and a message naming the argument."""
from __future__ import annotations

import pytest
import torch

import set_kernels as sk
from conftest import gen, randn

BSL = sk.BlockSparseLayout
linear = sk.ops.block_sparse_linear


@pytest.fixture
def setup():
    """A (rows=40, cols=70, b=16) layout with matching fp32 x, values and bias."""
    layout = BSL.random(40, 70, 16, 0.5, generator=gen(0))
    values = randn(layout.nnz_blocks, 16, 16, seed=1)
    x = randn(3, 70, seed=2)
    bias = randn(40, seed=3)
    return layout, values, x, bias


# ---------------------------------------------------------------------- block_sparse_linear
def test_x_wrong_last_dim(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^x: .*70"):
        linear(randn(3, 69, seed=0), values, layout, bias)


def test_x_scalar(setup):
    layout, values, _, bias = setup
    with pytest.raises(ValueError, match=r"^x: "):
        linear(torch.tensor(1.0), values, layout, bias)


def test_x_not_a_tensor(setup):
    layout, values, x, bias = setup
    with pytest.raises(TypeError, match=r"^x: "):
        linear(x.tolist(), values, layout, bias)


def test_x_integer_dtype(setup):
    layout, values, x, bias = setup
    with pytest.raises(TypeError, match=r"^x: .*floating"):
        linear(x.long(), values, layout, bias)


def test_values_wrong_block_shape(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^values: .*shape"):
        linear(x, randn(layout.nnz_blocks, 16, 17, seed=0), layout, bias)


def test_values_wrong_count(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^values: .*shape"):
        linear(x, randn(layout.nnz_blocks + 1, 16, 16, seed=0), layout, bias)


def test_values_flat(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^values: "):
        linear(x, values.reshape(-1), layout, bias)


def test_mixed_dtypes_x_values(setup):
    layout, values, x, bias = setup
    with pytest.raises(TypeError, match=r"^values: .*dtype"):
        linear(x, values.double(), layout, bias)


def test_mixed_dtypes_bias(setup):
    layout, values, x, bias = setup
    with pytest.raises(TypeError, match=r"^bias: .*dtype"):
        linear(x, values, layout, bias.double())


@pytest.mark.parametrize("shape", [(39,), (41,), (1, 40), ()])
def test_bias_wrong_shape(setup, shape):
    layout, values, x, _ = setup
    with pytest.raises(ValueError, match=r"^bias: .*shape"):
        linear(x, values, layout, torch.ones(shape))


def test_layout_not_a_layout(setup):
    layout, values, x, bias = setup
    with pytest.raises(TypeError, match=r"^layout: "):
        linear(x, values, layout.block_mask(), bias)


def test_x_on_other_device(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^values: .*device"):
        linear(x.to("meta"), values, layout, bias)


def test_bias_on_other_device(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^bias: .*device"):
        linear(x, values, layout, bias.to("meta"))


def test_layout_on_other_device(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^layout: .*device"):
        linear(x, values, layout.to("meta"), bias)


def test_unknown_backend(setup):
    layout, values, x, bias = setup
    with pytest.raises(ValueError, match=r"^backend: .*'numpy'"):
        linear(x, values, layout, bias, backend="numpy")


# ------------------------------------------------------------------------ to_dense / from_dense
def test_to_dense_wrong_values(setup):
    layout, values, _, _ = setup
    with pytest.raises(ValueError, match=r"^values: "):
        sk.ops.to_dense(values[1:], layout)


def test_from_dense_wrong_weight_shape(setup):
    layout, _, _, _ = setup
    with pytest.raises(ValueError, match=r"^weight: .*shape"):
        sk.ops.from_dense(randn(70, 40, seed=0), layout)


def test_from_dense_other_device(setup):
    layout, _, _, _ = setup
    with pytest.raises(ValueError, match=r"^layout: .*device"):
        sk.ops.from_dense(randn(40, 70, seed=0).to("meta"), layout)


# ------------------------------------------------------------------------------------ density
@pytest.mark.parametrize("density", [-0.1, 1.1, float("nan")])
@pytest.mark.parametrize("make", ["layout", "sparse", "masked", "sparsify", "sparse_from_dense",
                                  "masked_from_dense"])
def test_density_out_of_range(make, density):
    with pytest.raises(ValueError, match=r"^density: .*\[0, 1\]"):
        if make == "layout":
            BSL.random(64, 64, 32, density)
        elif make == "sparse":
            sk.nn.SparseLinear(64, 64, density=density)
        elif make == "masked":
            sk.nn.MaskedLinear(64, 64, density=density)
        elif make == "sparsify":
            sk.sparsify(torch.nn.Sequential(torch.nn.Linear(64, 64)), density=density)
        elif make == "sparse_from_dense":
            sk.nn.SparseLinear.from_dense(torch.nn.Linear(64, 64), density=density)
        else:
            sk.nn.MaskedLinear.from_dense(torch.nn.Linear(64, 64), density=density)


def test_density_not_a_number():
    with pytest.raises(TypeError, match=r"^density: "):
        BSL.random(64, 64, 32, "0.5")


# --------------------------------------------------------------------------------- block size
@pytest.mark.parametrize("block_size", [8, 256, 0, 48])
@pytest.mark.parametrize("make", ["layout", "mask", "sparse", "sparsify"])
def test_unsupported_block_size(make, block_size):
    with pytest.raises(ValueError, match=r"^block_size: .*16, 32, 64, 128"):
        _build_with_block_size(make, block_size)


@pytest.mark.parametrize("block_size", [32.0, "32", True])
@pytest.mark.parametrize("make", ["layout", "mask", "sparse", "sparsify"])
def test_non_int_block_size(make, block_size):
    with pytest.raises(TypeError, match=r"^block_size: "):
        _build_with_block_size(make, block_size)


def _build_with_block_size(make, block_size):
    if make == "layout":
        BSL.random(64, 64, block_size, 0.5)
    elif make == "mask":
        BSL.from_block_mask(torch.ones(2, 2, dtype=torch.bool), block_size)
    elif make == "sparse":
        sk.nn.SparseLinear(64, 64, block_size=block_size)
    else:
        sk.sparsify(torch.nn.Sequential(torch.nn.Linear(64, 64)), density=0.5, block_size=block_size)


# --------------------------------------------------------------------------------- block mask
@pytest.mark.parametrize("mask", [torch.ones(2, 2, dtype=torch.uint8), torch.ones(2, 2), torch.ones(2, 2).long()])
def test_block_mask_not_bool(mask):
    with pytest.raises(TypeError, match=r"^block_mask: .*bool"):
        BSL.from_block_mask(mask, 32)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), ()])
def test_block_mask_not_2d(shape):
    with pytest.raises(ValueError, match=r"^block_mask: .*2-D"):
        BSL.from_block_mask(torch.ones(shape, dtype=torch.bool), 32)


def test_block_mask_not_a_tensor():
    with pytest.raises(TypeError, match=r"^block_mask: "):
        BSL.from_block_mask([[True, False]], 32)


# ------------------------------------------------------------------------------- hand-made CSR
# grid 3 x 4 (shape (70, 100), b=32)
@pytest.mark.parametrize("row_ptr,col_idx,name", [
    ([0, 2, 2, 5], [1, 4, 0, 1, 2], "col_idx"),      # out of range
    ([0, 2, 2, 5], [1, 3, 0, -2, 2], "col_idx"),     # negative
    ([0, 2, 2, 5], [3, 1, 0, 1, 2], "col_idx"),      # unsorted
    ([0, 2, 2, 5], [1, 3, 2, 2, 3], "col_idx"),      # duplicate
    ([0, 2, 5], [1, 3, 0, 1, 2], "row_ptr"),         # wrong length
    ([0, 2, 2, 6], [1, 3, 0, 1, 2], "row_ptr"),      # ends past nnz
])
def test_from_csr_invalid(row_ptr, col_idx, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        BSL.from_csr(torch.tensor(row_ptr), torch.tensor(col_idx), 32, (70, 100))


def test_from_csr_different_devices():
    with pytest.raises(ValueError, match=r"^col_idx: .*device"):
        BSL.from_csr(torch.tensor([0, 1]), torch.tensor([0]).to("meta"), 32, (32, 32))


def test_from_csr_2d_index():
    with pytest.raises(ValueError, match=r"^col_idx: .*1-D"):
        BSL.from_csr(torch.tensor([0, 1]), torch.tensor([[0]]), 32, (32, 32))


@pytest.mark.parametrize("rows,cols,name", [(0, 10, "rows"), (10, -1, "cols")])
def test_layout_bad_shape(rows, cols, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        BSL.random(rows, cols, 16, 0.5)


# ------------------------------------------------------------------------------- masked_adam_
def adam_lists(n=2):
    params = [randn(4, 5, seed=i) for i in range(n)]
    return (params, [randn(4, 5, seed=10 + i) for i in range(n)], [torch.zeros(4, 5) for _ in range(n)],
            [torch.zeros(4, 5) for _ in range(n)], [None] * n)


HYPER = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def test_adam_mismatched_list_lengths():
    p, g, m, v, masks = adam_lists()
    with pytest.raises(ValueError, match=r"^grads: .*2 entries"):
        sk.ops.masked_adam_(p, g[:1], m, v, masks, **HYPER)
    with pytest.raises(ValueError, match=r"^masks: "):
        sk.ops.masked_adam_(p, g, m, v, masks[:1], **HYPER)


def test_adam_mismatched_shapes():
    p, g, m, v, masks = adam_lists()
    g[1] = randn(5, 4, seed=0)
    with pytest.raises(ValueError, match=r"^grads\[1\]: .*shape"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)
    p, g, m, v, masks = adam_lists()
    v[0] = torch.zeros(20)
    with pytest.raises(ValueError, match=r"^exp_avg_sqs\[0\]: .*shape"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)
    p, g, m, v, masks = adam_lists()
    masks[0] = torch.ones(5, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^masks\[0\]: .*shape"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)


def test_adam_non_bool_mask():
    p, g, m, v, masks = adam_lists()
    masks[1] = torch.ones(4, 5)
    with pytest.raises(TypeError, match=r"^masks\[1\]: .*bool"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)


def test_adam_grad_dtype():
    p, g, m, v, masks = adam_lists()
    g[0] = g[0].double()
    with pytest.raises(TypeError, match=r"^grads\[0\]: .*dtype"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)


def test_adam_non_contiguous_param():
    p, g, m, v, masks = adam_lists()
    p[0] = randn(5, 4, seed=0).T
    with pytest.raises(ValueError, match=r"^params\[0\]: .*contiguous"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)


def test_adam_other_device():
    p, g, m, v, masks = adam_lists()
    m[1] = m[1].to("meta")
    with pytest.raises(ValueError, match=r"^exp_avgs\[1\]: .*device"):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)


@pytest.mark.parametrize("step", [0, -1, 1.0, True])
def test_adam_bad_step(step):
    with pytest.raises(ValueError, match=r"^step: "):
        sk.ops.masked_adam_(*adam_lists(), **{**HYPER, "step": step})


@pytest.mark.parametrize("name,value", [("lr", -1e-3), ("beta1", 1.0), ("beta2", -0.5), ("eps", -1.0),
                                        ("weight_decay", -0.1)])
def test_adam_bad_hyperparameter(name, value):
    kwargs = {**HYPER, name: value}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        sk.ops.masked_adam_(*adam_lists(), **kwargs)


def test_adam_found_inf_not_one_element():
    with pytest.raises(ValueError, match=r"^found_inf: "):
        sk.ops.masked_adam_(*adam_lists(), found_inf=torch.zeros(2), **HYPER)


def test_adam_unknown_backend():
    with pytest.raises(ValueError, match=r"^backend: "):
        sk.ops.masked_adam_(*adam_lists(), backend="jax", **HYPER)


# ------------------------------------------------------------------------------- MaskedAdam
@pytest.mark.parametrize("betas,name", [((0.9,), "betas"), (0.9, "betas"), ((1.0, 0.999), "beta1"),
                                        ((0.9, 1.5), "beta2"), ((-0.1, 0.999), "beta1")])
def test_masked_adam_bad_betas(betas, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        sk.optim.MaskedAdam([torch.nn.Parameter(torch.ones(3))], betas=betas)


def test_masked_adam_negative_lr():
    with pytest.raises(ValueError, match=r"^lr: "):
        sk.optim.MaskedAdam([torch.nn.Parameter(torch.ones(3))], lr=-1.0)


def test_masked_adam_bad_mask():
    p = torch.nn.Parameter(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"^masks: .*bool"):
        sk.optim.MaskedAdam([p], masks={p: torch.ones(3, 4)})
    with pytest.raises(ValueError, match=r"^masks: .*shape"):
        sk.optim.MaskedAdam([p], masks={p: torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"^masks: "):
        sk.optim.MaskedAdam([p], masks={torch.nn.Parameter(torch.ones(3, 4)): torch.ones(3, 4, dtype=torch.bool)})


def test_masked_adam_unknown_backend():
    with pytest.raises(ValueError, match=r"^backend: "):
        sk.optim.MaskedAdam([torch.nn.Parameter(torch.ones(3))], backend="tpu")


# ---------------------------------------------------------------------------------- sparsify
def test_sparsify_no_linear():
    with pytest.raises(ValueError, match=r"^model: .*Linear"):
        sk.sparsify(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv1d(2, 2, 1)), density=0.5)


def test_sparsify_everything_excluded():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^model: "):
        sk.sparsify(model, density=0.5, exclude=["0"])


def test_sparsify_unknown_exclude():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^exclude: .*'2'"):
        sk.sparsify(model, density=0.5, exclude=["2"])
    # Nothing was replaced before the error.
    assert all(type(m) is torch.nn.Linear for m in model)


def test_sparsify_exclude_a_string():
    with pytest.raises(TypeError, match=r"^exclude: "):
        sk.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), density=0.5, exclude="0")


def test_sparsify_not_a_module():
    with pytest.raises(TypeError, match=r"^model: "):
        sk.sparsify([torch.nn.Linear(4, 4)], density=0.5)


@pytest.mark.parametrize("call", ["sparsify", "layer_densities"])
def test_unknown_distribution(call):
    with pytest.raises(ValueError, match=r"^distribution: .*'gaussian'"):
        if call == "sparsify":
            sk.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), density=0.5, distribution="gaussian")
        else:
            sk.nn.layer_densities([(4, 4)], 0.5, "gaussian")


# ---------------------------------------------------------------------------------- layers
def test_from_dense_not_a_linear():
    with pytest.raises(TypeError, match=r"^linear: "):
        sk.nn.SparseLinear.from_dense(torch.nn.Conv1d(2, 2, 1), density=0.5)
    with pytest.raises(TypeError, match=r"^linear: "):
        sk.nn.MaskedLinear.from_dense(torch.nn.Conv1d(2, 2, 1), density=0.5)


@pytest.mark.parametrize("cls", [sk.nn.SparseLinear, sk.nn.MaskedLinear])
def test_layer_bad_features(cls):
    with pytest.raises(ValueError, match=r"^in_features: "):
        cls(0, 10)
    with pytest.raises(TypeError, match=r"^out_features: "):
        cls(10, 10.0)


def test_sparse_linear_layout_mismatch():
    layout = BSL.random(32, 64, 16, 0.5)
    with pytest.raises(ValueError, match=r"^layout: "):
        sk.nn.SparseLinear(32, 64, block_size=16, layout=layout)  # shape is (out, in) = (64, 32)


def test_adam_checks_everything_before_updating_anything():
    p, g, m, v, masks = adam_lists(3)
    masks[2] = torch.ones(4, 5)  # only the last entry is bad
    before = [t.clone() for t in p + m + v]
    with pytest.raises(TypeError, match=r"^masks\[2\]: "):
        sk.ops.masked_adam_(p, g, m, v, masks, **HYPER)
    for t, b in zip(p + m + v, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("make", [
    lambda: sk.nn.SparseLinear(64, 64, backend="cuda-fast"),
    lambda: sk.optim.MaskedAdam([torch.nn.Parameter(torch.randn(3))], backend="gpu"),
])
def test_unknown_backend_name_at_construction(make):
    with pytest.raises(ValueError, match="backend"):
        make()
