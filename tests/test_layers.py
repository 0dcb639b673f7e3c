"""SparseLinear, MaskedLinear, sparsify and layer_densities."""
from __future__ import annotations

import warnings

import pytest
import torch

import set_kernels as sk
from conftest import blocks_ref, csr_blocks, dense_ref, gen, randn
from set_kernels.nn import layer_densities

SparseLinear, MaskedLinear = sk.nn.SparseLinear, sk.nn.MaskedLinear


# ------------------------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("in_f,out_f,b,density", [(784, 1000, 32, 0.3), (47, 33, 16, 1.0), (130, 200, 64, 0.3),
                                                  (300, 130, 128, 0.5), (64, 96, 32, 0.0)])
def test_sparse_linear_forward_and_attributes(cpu_backend, in_f, out_f, b, density):
    layer = SparseLinear(in_f, out_f, density=density, block_size=b, dtype=torch.float64, generator=gen(1),
                         backend=cpu_backend)
    layout = layer.layout
    assert layout.shape == (out_f, in_f) and layout.block_size == b
    n_blocks = -(-out_f // b) * -(-in_f // b)
    assert layout.nnz_blocks == round(density * n_blocks)
    assert layer.values.shape == (layout.nnz_blocks, b, b) and isinstance(layer.values, torch.nn.Parameter)
    assert layer.bias.shape == (out_f,) and layer.values.dtype == torch.float64
    # Edge parts of blocks hold zeros; the weight follows nn.Linear's init bound on live entries.
    w = layer.dense_weight()
    assert w.shape == (out_f, in_f)
    assert torch.equal(w.double(), dense_ref(layer.values, layout))
    assert torch.equal(layer.values.detach(), blocks_ref(w, layout))
    if layout.nnz_blocks:
        live = w[layout.element_mask()]
        assert (live != 0).all() and live.abs().max() <= in_f ** -0.5
    x = randn(2, 3, in_f, dtype=torch.float64, seed=2)
    y = layer(x)
    assert y.shape == (2, 3, out_f)
    torch.testing.assert_close(y, x @ w.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_sparse_linear_without_bias_and_default_dtype(cpu_backend):
    layer = SparseLinear(70, 40, bias=False, density=0.5, block_size=16, generator=gen(3), backend=cpu_backend)
    assert layer.bias is None and layer.values.dtype == torch.get_default_dtype()
    x = randn(4, 70, seed=1)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in layer.named_parameters()] == ["values"]


def test_sparse_linear_from_dense_keeps_largest_norm_blocks():
    b = 32
    linear = torch.nn.Linear(80, 50)  # grid 2 x 3 blocks, edge blocks partial
    with torch.no_grad():
        linear.weight.copy_(randn(50, 80, seed=1, scale=0.01))
        # Big blocks at (0, 2) (partial: cols 64..80) and (1, 0) (partial: rows 32..50).
        linear.weight[0:32, 64:80] += 5.0
        linear.weight[32:50, 0:32] -= 3.0
    sparse = SparseLinear.from_dense(linear, density=2 / 6, block_size=b)
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[0, 2] = expected[1, 0] = True
    assert torch.equal(sparse.layout.block_mask(), expected)
    assert sparse.layout.shape == (50, 80)
    assert torch.equal(sparse.dense_weight(), linear.weight.detach() * sparse.layout.element_mask())
    assert torch.equal(sparse.bias, linear.bias)
    # The out-of-range parts of the kept edge blocks are zero.
    assert torch.equal(sparse.values.detach(), blocks_ref(linear.weight, sparse.layout).float())


def test_sparse_linear_from_dense_density_count():
    linear = torch.nn.Linear(200, 130)
    for density in (0.0, 0.3, 1.0):
        sparse = SparseLinear.from_dense(linear, density=density, block_size=32)
        assert sparse.layout.nnz_blocks == round(density * 5 * 7)
        # Kept blocks have the largest norms: every kept norm >= every dropped norm.
        padded = torch.nn.functional.pad(linear.weight.detach(), (0, 24, 0, 30))
        norms = padded.reshape(5, 32, 7, 32).square().sum((1, 3))
        kept = sparse.layout.block_mask()
        if 0 < kept.sum() < kept.numel():
            assert norms[kept].min() >= norms[~kept].max()


def test_sparse_linear_state_dict_round_trip(cpu_backend):
    a = SparseLinear(100, 70, density=0.4, block_size=16, generator=gen(1), backend=cpu_backend)
    b = SparseLinear(100, 70, density=0.4, block_size=16, generator=gen(2), backend=cpu_backend)
    x = randn(5, 100, seed=3)
    assert a.layout != b.layout  # the round trip below has something to do
    sd = a.state_dict()
    assert {"values", "bias", "row_ptr", "col_idx"} <= set(sd)
    b.load_state_dict(sd)
    assert b.layout == a.layout
    assert torch.equal(b.layout.block_mask(), a.layout.block_mask())
    assert torch.equal(b(x), a(x))
    assert torch.equal(b.dense_weight(), a.dense_weight())


def test_sparse_linear_set_layout(cpu_backend):
    layer = SparseLinear(64, 48, density=0.5, block_size=16, generator=gen(1), backend=cpu_backend)
    new_layout = sk.BlockSparseLayout.random(48, 64, 16, 0.5, generator=gen(2))
    assert new_layout != layer.layout
    new_values = randn(new_layout.nnz_blocks, 16, 16, seed=3)
    layer.set_layout(new_layout, new_values)
    assert layer.layout == new_layout
    x = randn(3, 64, seed=4)
    w = dense_ref(new_values, new_layout).float()
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_sparse_linear_backward_reaches_values_and_bias(cpu_backend):
    layer = SparseLinear(47, 33, density=1.0, block_size=16, dtype=torch.float64, generator=gen(1),
                         backend=cpu_backend)
    x = randn(4, 47, dtype=torch.float64, seed=2)
    dy = randn(4, 33, dtype=torch.float64, seed=3)
    layer(x).backward(dy)
    torch.testing.assert_close(layer.values.grad, blocks_ref(dy.T @ x, layer.layout), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dy.sum(0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- MaskedLinear
@pytest.mark.parametrize("in_f,out_f,density", [(784, 300, 0.1), (47, 33, 0.37), (16, 17, 1.0), (10, 10, 0.0),
                                                (5, 3, 0.5)])
def test_masked_linear_mask_and_weight(in_f, out_f, density):
    layer = MaskedLinear(in_f, out_f, density=density, generator=gen(1))
    assert layer.mask.dtype == torch.bool and layer.mask.shape == (out_f, in_f)
    assert int(layer.mask.sum()) == round(density * in_f * out_f)
    assert torch.equal(layer.weight[~layer.mask], torch.zeros_like(layer.weight[~layer.mask]))
    assert (layer.weight[layer.mask] != 0).all()
    assert "mask" in dict(layer.named_buffers())
    x = randn(6, in_f, seed=2)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).T + layer.bias)


def test_masked_linear_masked_entries_get_no_gradient():
    layer = MaskedLinear(30, 20, density=0.3, generator=gen(1))
    with torch.no_grad():
        layer.weight.fill_(0.5)  # nonzero masked weights must not leak into the output
    x = randn(4, 30, seed=2)
    y = layer(x)
    torch.testing.assert_close(y, x @ (0.5 * layer.mask.float()).T + layer.bias)
    y.sum().backward()
    assert torch.equal(layer.weight.grad[~layer.mask], torch.zeros((~layer.mask).sum().item()))


def test_masked_linear_from_dense_keeps_largest_abs():
    linear = torch.nn.Linear(9, 7)
    magnitudes = torch.randperm(63, generator=gen(1)).float() + 1.0  # distinct magnitudes
    signs = torch.where(torch.rand(63, generator=gen(2)) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        linear.weight.copy_((magnitudes * signs).reshape(7, 9))
    k = round(0.3 * 63)
    masked = MaskedLinear.from_dense(linear, density=0.3)
    expected = (magnitudes > 63 - k).reshape(7, 9)  # the k largest |w|
    assert torch.equal(masked.mask, expected)
    assert torch.equal(masked.weight, linear.weight.detach() * expected)
    assert torch.equal(masked.bias, linear.bias)


def test_masked_linear_state_dict_round_trip():
    a = MaskedLinear(40, 30, density=0.2, generator=gen(1))
    b = MaskedLinear(40, 30, density=0.2, generator=gen(2))
    assert not torch.equal(a.mask, b.mask)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mask, a.mask) and torch.equal(b.weight, a.weight)
    x = randn(5, 40, seed=3)
    assert torch.equal(b(x), a(x))


# ---------------------------------------------------------------------------------- sparsify
def mlp(sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def live_and_size(model):
    live = size = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            live += int(m.layout.element_mask().sum())
            size += m.in_features * m.out_features
        elif isinstance(m, MaskedLinear):
            live += int(m.mask.sum())
            size += m.mask.numel()
    return live, size


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("block_size", [32, None], ids=["sparse", "masked"])
def test_sparsify_total_density_and_types(distribution, block_size):
    sizes = [256, 512, 128, 64] if block_size else [784, 300, 100, 10]
    model = mlp(sizes)
    dense_weights = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    out = sk.sparsify(model, density=0.2, block_size=block_size, distribution=distribution)
    assert out is model
    kind = SparseLinear if block_size else MaskedLinear
    sparse_layers = [m for m in model if isinstance(m, (SparseLinear, MaskedLinear))]
    assert len(sparse_layers) == 3 and all(type(m) is kind for m in sparse_layers)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    live, size = live_and_size(model)
    # Each layer rounds to whole blocks (b*b entries) or whole elements.
    unit = block_size ** 2 if block_size else 1
    assert abs(live - 0.2 * size) <= 0.5 * unit * len(sparse_layers) + 1e-6
    # Weights were transferred: kept entries equal the dense weights.
    for m, w in zip(sparse_layers, dense_weights):
        dense = m.dense_weight() if block_size else m.weight * m.mask
        keep = m.layout.element_mask() if block_size else m.mask
        assert torch.equal(dense.detach(), w * keep)
    # Per-layer densities follow the distribution.
    densities = [live_and_size(torch.nn.Sequential(m))[0] / (m.in_features * m.out_features) for m in sparse_layers]
    if distribution == "uniform":
        assert max(densities) - min(densities) <= 3 * unit / min(m.in_features * m.out_features for m in sparse_layers)
    else:  # the smallest layer (fan-in + fan-out over size largest) is densest
        assert densities[-1] > densities[0]


def test_sparsify_exclude_keeps_named_layers():
    model = torch.nn.Sequential()
    model.add_module("encoder", mlp([64, 64, 64]))
    model.add_module("head", torch.nn.Linear(64, 10))
    sk.sparsify(model, density=0.5, block_size=16, distribution="uniform", exclude=["head", "encoder.0"])
    assert type(model.head) is torch.nn.Linear
    assert type(model.encoder[0]) is torch.nn.Linear
    assert type(model.encoder[2]) is SparseLinear
    assert model.encoder[2].layout.density == 0.5


def test_sparsify_er_makes_small_layer_dense():
    model = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(512, 512)])
    # ER would give the 4 x 4 layer 0.3 * (16 + 512**2) / (8 + 1024) * 8 / 16 = 38 > 1.
    densities = layer_densities([(4, 4), (512, 512)], 0.3, "er")
    assert densities[0] == 1.0
    assert densities[1] == pytest.approx((0.3 * (16 + 512 ** 2) - 16) / 512 ** 2, rel=1e-12)
    sk.sparsify(model, density=0.3, block_size=None, distribution="er")
    assert type(model[0]) is MaskedLinear and bool(model[0].mask.all())
    assert torch.equal(model[0].weight, model[0].weight * model[0].mask)
    live, size = live_and_size(model)
    assert abs(live - 0.3 * size) <= 2


def test_sparsified_model_trains_with_masked_adam(cpu_backend):
    model = mlp([64, 48, 10])
    sk.sparsify(model, density=0.3, block_size=16, distribution="erk")
    for m in model:
        if isinstance(m, SparseLinear):
            m.backend = cpu_backend
    opt = sk.optim.MaskedAdam(model.parameters(), lr=1e-2, backend=cpu_backend)
    x, target = randn(32, 64, seed=1), torch.randint(0, 10, (32,), generator=gen(2))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_sparsify_reports_and_logs_what_it_converted(caplog):
    model = torch.nn.Sequential()
    model.add_module("encoder", mlp([64, 64, 64]))
    model.add_module("head", torch.nn.Linear(64, 10))
    with caplog.at_level("INFO", logger="set_kernels.nn.sparsify"):
        out, report = sk.sparsify(model, density=0.3, block_size=16, distribution="erk", exclude=["head"],
                                  return_report=True)
    assert out is model
    assert [c.name for c in report.converted] == ["encoder.0", "encoder.2"]
    assert [(s.name, s.reason) for s in report.skipped] == [("head", "excluded")]
    for c in report.converted:
        layer = model.get_submodule(c.name)
        assert c.kind == "SparseLinear" and c.shape == (64, 64) and c.aliases == ()
        assert c.live == int(layer.layout.element_mask().sum())
        assert c.density == pytest.approx(c.live / 64 ** 2) and c.density == pytest.approx(layer.layout.density)
    assert report.density == pytest.approx(sum(c.live for c in report.converted) / (2 * 64 ** 2))
    text = caplog.text
    assert "encoder.0" in text and "encoder.2" in text and "SparseLinear" in text and f"{report.density:.4f}" in text
    assert "head" in str(report) and "excluded" in str(report)
    # Without return_report the model alone comes back (the documented signature).
    assert sk.sparsify(mlp([32, 32]), density=0.5, block_size=None) is not None


def test_sparsify_exclude_names_a_subtree():
    model = torch.nn.Sequential()
    model.add_module("encoder", mlp([64, 64, 64]))
    model.add_module("head", torch.nn.Linear(64, 10))
    sk.sparsify(model, density=0.5, block_size=16, distribution="uniform", exclude=["encoder"])
    assert type(model.encoder[0]) is torch.nn.Linear and type(model.encoder[2]) is torch.nn.Linear
    assert type(model.head) is SparseLinear


class LoRALinear(torch.nn.Linear):
    """A subclass whose forward is not F.linear(x, weight, bias)."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.lora = torch.nn.Parameter(torch.zeros(n_out, n_in))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight + self.lora, self.bias)


def test_sparsify_keeps_linear_subclasses_and_says_so():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(32, 4), "lora": LoRALinear(32, 32),
                                 "ff": torch.nn.Linear(32, 32)})
    with pytest.warns(UserWarning, match=r"attn\.out_proj .*NonDynamicallyQuantizableLinear.*lora \(LoRALinear\)"):
        _, report = sk.sparsify(model, density=0.5, block_size=16, return_report=True)
    assert type(model["lora"]) is LoRALinear and type(model["attn"].out_proj) is not SparseLinear
    assert [c.name for c in report.converted] == ["ff"]
    assert {s.name: s.reason for s in report.skipped} == {"attn.out_proj": "subclass", "lora": "subclass"}
    x = randn(5, 2, 32, seed=1)
    model["attn"](x, x, x)  # the attention still works: it reads out_proj.weight directly
    # Named in exclude: kept silently.
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(32, 4), "ff": torch.nn.Linear(32, 32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.sparsify(model, density=0.5, block_size=16, exclude=["attn"])
    assert type(model["ff"]) is SparseLinear


def test_sparsify_keeps_parametrized_and_hooked_layers():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    parametrize.register_parametrization(model[0], "weight", Double())
    model[1].register_forward_hook(lambda mod, inp, out: out)
    with pytest.warns(UserWarning, match=r"0 .*parametrized.*; 1 .*forward hooks"):
        _, report = sk.sparsify(model, density=0.5, block_size=16, return_report=True)
    assert {s.name: s.reason for s in report.skipped} == {"0": "subclass", "1": "hooks"}
    assert parametrize.is_parametrized(model[0]) and type(model[1]) is torch.nn.Linear
    assert type(model[2]) is SparseLinear


class TiedLM(torch.nn.Module):
    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_sparsify_keeps_tied_weights_tied():
    torch.manual_seed(0)
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"head \(Linear\): its weight is shared with another module"):
        _, report = sk.sparsify(model, density=0.5, block_size=16, return_report=True)
    assert type(model.head) is torch.nn.Linear and model.head.weight is model.embed.weight
    assert type(model.body) is SparseLinear
    assert [(s.name, s.reason) for s in report.skipped] == [("head", "tied")]
    model(torch.tensor([[1, 2, 3]]))
    # Two linears sharing one weight Parameter: both kept (converting either would untie them).
    a, b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    b.weight = a.weight
    model = torch.nn.Sequential(a, torch.nn.ReLU(), b, torch.nn.Linear(32, 32))
    with pytest.warns(UserWarning, match="shared"):
        _, report = sk.sparsify(model, density=0.5, block_size=16, return_report=True)
    assert model[0].weight is model[2].weight and type(model[3]) is SparseLinear
    assert sorted(s.name for s in report.skipped) == ["0", "2"]


@pytest.mark.parametrize("block_size", [16, None], ids=["sparse", "masked"])
def test_sparsify_converts_a_shared_module_once_and_keeps_it_shared(block_size):
    torch.manual_seed(0)
    shared = torch.nn.Linear(32, 32)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.Linear(32, 32))
    _, report = sk.sparsify(model, density=0.5, block_size=block_size, distribution="uniform", return_report=True)
    assert model[0] is model[2] and type(model[0]) is (SparseLinear if block_size else MaskedLinear)
    assert [(c.name, c.aliases) for c in report.converted] == [("0", ("2",)), ("3", ())]
    # Counted once toward the total: two 32 x 32 weights, not three.
    assert report.size == 2 * 32 * 32
    assert sum(isinstance(p, torch.nn.Parameter) for p in model.parameters()) == 4  # no duplicate parameters


def test_sparsify_keeps_requires_grad_and_mode():
    model = mlp([32, 32, 32]).eval()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    sk.sparsify(model, density=0.5, block_size=16)
    assert not model[0].values.requires_grad and not model[0].bias.requires_grad
    assert model[2].values.requires_grad and model[2].bias.requires_grad
    assert not model[0].training and not model[2].training


# ---------------------------------------------------------------------------- layer_densities
@pytest.mark.parametrize("distribution", ["er", "erk"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_layer_densities_exact(distribution, density):
    shapes = [(1000, 784), (1000, 1000), (10, 1000), (3, 3)]
    sizes = [o * i for o, i in shapes]
    ds = layer_densities(shapes, density, distribution)
    assert len(ds) == len(shapes) and all(0 <= d <= 1 for d in ds)
    assert sum(d * n for d, n in zip(ds, sizes)) == pytest.approx(density * sum(sizes), rel=1e-12)
    # Non-dense layers have densities proportional to (n_in + n_out) / (n_in * n_out).
    free = [k for k, d in enumerate(ds) if d < 1.0]
    ratios = [ds[k] / ((shapes[k][0] + shapes[k][1]) / sizes[k]) for k in free]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    # A dense layer is one whose ER density would have exceeded the common scale.
    for k, d in enumerate(ds):
        if d == 1.0:
            assert (shapes[k][0] + shapes[k][1]) / sizes[k] * ratios[0] >= 1.0


def test_layer_densities_uniform():
    assert layer_densities([(10, 20), (30, 40)], 0.25, "uniform") == [0.25, 0.25]


def test_layer_densities_full_density_is_all_dense():
    assert layer_densities([(10, 20), (30, 40)], 1.0, "erk") == pytest.approx([1.0, 1.0])


# ------------------------------------------------------------------------- copies and pickling
def test_deepcopy_masked_linear_keeps_its_own_mask_for_masked_adam(cpu_backend):
    import copy

    original = MaskedLinear(12, 10, density=0.4, generator=gen(1))
    clone = copy.deepcopy(original)
    assert torch.equal(clone.mask, original.mask) and clone.mask is not original.mask
    opt = sk.optim.MaskedAdam(clone.parameters(), lr=1e-2, backend=cpu_backend)
    assert opt.mask_for(clone.weight) is clone.mask  # found automatically on the copy too
    with torch.no_grad():
        clone.weight.fill_(1.0)
    clone.weight.grad = randn(10, 12, seed=2)
    clone.bias.grad = randn(10, seed=3)
    opt.step()
    assert torch.equal(clone.weight[~clone.mask], torch.zeros_like(clone.weight[~clone.mask]))


def test_deepcopy_sparse_linear(cpu_backend):
    import copy

    layer = SparseLinear(70, 40, density=0.5, block_size=16, generator=gen(1), backend=cpu_backend)
    clone = copy.deepcopy(layer)
    x = randn(3, 70, seed=2)
    assert clone.layout == layer.layout
    assert torch.equal(clone(x), layer(x))
    with torch.no_grad():
        clone.values.mul_(2)
    assert not torch.equal(clone(x), layer(x))  # a real copy, not shared storage


@pytest.mark.parametrize("kind", ["sparse", "masked"])
def test_torch_save_whole_module(kind, tmp_path):
    """torch.save(model) / torch.load(weights_only=False) work for any nn.Module; so must ours."""
    if kind == "sparse":
        layer = SparseLinear(70, 40, density=0.5, block_size=16, generator=gen(1))
    else:
        layer = MaskedLinear(70, 40, density=0.5, generator=gen(1))
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = randn(3, 70, seed=2)
    assert torch.equal(loaded(x), model(x))
    if kind == "masked":
        opt = sk.optim.MaskedAdam(loaded.parameters())
        assert opt.mask_for(loaded[0].weight) is loaded[0].mask


def test_sparse_linear_dtype_conversion(cpu_backend):
    layer = SparseLinear(70, 40, density=0.5, block_size=16, generator=gen(1), backend=cpu_backend).double()
    assert layer.values.dtype == torch.float64 and layer.row_ptr.dtype == torch.int32
    x = randn(3, 70, dtype=torch.float64, seed=2)
    torch.testing.assert_close(layer(x), x @ dense_ref(layer.values, layer.layout).T + layer.bias,
                               rtol=1e-12, atol=1e-12)
