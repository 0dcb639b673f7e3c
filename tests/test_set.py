"""SET topology evolution: invariants over many updates, rules, schedules, ERK, resume, bad arguments."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import set_kernels as sk
from set_kernels.evolution import set as set_module
from set_kernels.nn import MaskedLinear, SparseLinear, layer_densities

from conftest import csr_blocks, dense_ref, gen, randn


# --------------------------------------------------------------------------- helpers
def block_set(layout) -> list[tuple[int, int]]:
    return csr_blocks(layout)


def check_layout(layout) -> None:
    """CSR is sorted without duplicates, and the transposed index describes the same blocks."""
    blocks = csr_blocks(layout)
    assert len(set(blocks)) == len(blocks) == layout.nnz_blocks, "duplicate blocks"
    assert blocks == sorted(blocks), "CSR not in row-major order"
    # An independent constructor validates the CSR (raises on unsorted / duplicate / out of range).
    sk.BlockSparseLayout.from_csr(layout.row_ptr, layout.col_idx, layout.block_size, layout.shape)
    col_ptr, row_idx, perm = layout.col_ptr.tolist(), layout.row_idx.tolist(), layout.perm.tolist()
    assert sorted(perm) == list(range(layout.nnz_blocks))
    csc = []
    for c in range(len(col_ptr) - 1):
        for q in range(col_ptr[c], col_ptr[c + 1]):
            assert blocks[perm[q]] == (row_idx[q], c), "transposed index disagrees with the CSR"
            csc.append((c, row_idx[q]))
    assert csc == sorted(csc) and len(csc) == layout.nnz_blocks
    assert layout.block_row.tolist() == [r for r, _ in blocks]


def set_rule_ref(signed: list[float], k: int) -> list[float]:
    """Sorted values the sign-split rule must prune from ``signed`` (live units only)."""
    pos = sorted(v for v in signed if v >= 0)
    neg = sorted((v for v in signed if v < 0), key=abs)
    k_neg, k_pos = k // 2, k - k // 2
    take_pos = min(k_pos + max(0, k_neg - len(neg)), len(pos))
    take_neg = k - take_pos
    return sorted(pos[:take_pos] + neg[:take_neg])


def build(kind: str, seed: int):
    g = gen(seed)
    if kind == "block":
        # odd shapes: partial edge blocks in both directions
        l1 = SparseLinear(70, 50, density=0.35, block_size=16, generator=g)
        l2 = SparseLinear(50, 37, density=0.5, block_size=16, generator=g)
    elif kind.startswith("element"):
        # element sparsity stored sparse (CSR): the units of MaskedLinear, without a dense weight
        l1 = SparseLinear(70, 50, density=0.2, block_size=1, generator=g)
        l2 = SparseLinear(50, 37, density=0.3, block_size=1, generator=g)
    else:
        l1 = MaskedLinear(70, 50, density=0.2, generator=g)
        l2 = MaskedLinear(50, 37, density=0.3, generator=g)
    return torch.nn.Sequential(l1, torch.nn.Tanh(), l2)


def make_optimizer(name: str, model):
    if name in ("sgd", "sgd-fused"):  # fused: one kernel for all tensors (what `set-kernels train` uses)
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                               fused=name == "sgd-fused")
    return sk.optim.MaskedAdam(model.parameters(), lr=0.01)


def train_step(model, opt, step: int, batch: int = 12):
    x = randn(batch, 70, seed=1000 + step)
    target = randn(batch, 37, seed=2000 + step)
    loss = F.mse_loss(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()


def dense_grad_ref(layer, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """float64 dL/dW of the dense weight for output gradient ``dy``."""
    return dy.double().T @ x.double()


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("kind", ["block", "masked", "element", "element-chunked"])
@pytest.mark.parametrize("prune,regrow,optim", [
    ("magnitude", "random", "adam"),
    ("set", "random", "sgd"),
    ("magnitude", "gradient", "sgd"),
    ("set", "gradient", "adam"),
    ("magnitude", "random", "sgd-fused"),
])
def test_invariants_over_many_updates(kind, prune, regrow, optim, monkeypatch):
    if kind == "element-chunked":
        # the dense gradient of gradient regrowth formed a few rows at a time (many chunks)
        monkeypatch.setattr(set_module, "GRAD_CHUNK_ELEMS", 150)
    sparse_storage = kind != "masked"
    model = build(kind, seed=3)
    opt = make_optimizer(optim, model)
    zeta = 0.3
    evo = sk.SET(model, opt, zeta=zeta, interval=2, prune=prune, regrow=regrow, seed=5)
    layers = [m for m in model if isinstance(m, (SparseLinear, MaskedLinear))]
    live0 = [m.layout.nnz_blocks if sparse_storage else int(m.mask.sum()) for m in layers]
    values0 = [m.values if sparse_storage else m.weight for m in layers]
    ptrs0 = [v.data_ptr() for v in values0]
    n_updates = 0
    captured = {}

    # independent dense-gradient capture for the gradient rule (hooks of the test's own)
    def cap(i):
        def hook(mod, inp, out):
            x = inp[0].detach()
            out.register_hook(lambda g: captured.__setitem__(i, dense_grad_ref(mod, x, g)))
        return hook
    handles = [m.register_forward_hook(cap(i)) for i, m in enumerate(layers)]

    for step in range(1, 25):
        train_step(model, opt, step)
        before = []
        for m in layers:
            if sparse_storage:
                p = m.values
                st = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
                before.append((block_set(m.layout), m.values.detach().clone(), st))
            else:
                p = m.weight
                st = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
                before.append((m.mask.clone(), m.weight.detach().clone(), st))
        changed = evo.step()
        assert changed == (step % 2 == 0)
        if not changed:
            continue
        n_updates += 1
        for i, m in enumerate(layers):
            old_set, old_vals, old_state = before[i]
            if sparse_storage:
                assert m.values is values0[i], "values must stay the same Parameter"
                assert m.values.data_ptr() == ptrs0[i], "values must keep its storage"
                new_set = block_set(m.layout)
                check_layout(m.layout)
                assert len(new_set) == live0[i]
                old_pos = {blk: j for j, blk in enumerate(old_set)}
                pruned = [blk for blk in old_set if blk not in set(new_set)]
                grown = [blk for blk in new_set if blk not in old_pos]
                k = round(zeta * live0[i])
                assert len(pruned) == len(grown) == k
                n_rows, n_cols = m.layout.grid
                # pruned were the weakest
                if prune == "magnitude":
                    score = old_vals.double().square().sum((1, 2)).tolist()
                    want = sorted(score)[:k]
                else:
                    score = old_vals.double().sum((1, 2)).tolist()
                    want = set_rule_ref(score, k)
                got = sorted(score[old_pos[blk]] for blk in pruned)
                assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
                # regrown: empty before, 0 now with 0 moments; kept blocks moved with their state
                for j, blk in enumerate(new_set):
                    if blk in old_pos:
                        assert torch.equal(m.values[j], old_vals[old_pos[blk]])
                        for key, v in old_state.items():
                            assert torch.equal(opt.state[m.values][key][j], v[old_pos[blk]]), key
                    else:
                        assert not m.values[j].any()
                        for key in old_state:
                            assert not opt.state[m.values][key][j].any(), key
                if regrow == "gradient":
                    g = captured[i]
                    rows, cols = m.layout.shape
                    b = m.block_size
                    full = torch.zeros(n_rows * b, n_cols * b, dtype=torch.float64)
                    full[:rows, :cols] = g
                    pooled = full.reshape(n_rows, b, n_cols, b).square().sum((1, 3))
                    empty = [pooled[r, c].item() for r in range(n_rows) for c in range(n_cols)
                             if (r, c) not in old_pos]
                    want = sorted(empty)[-k:]
                    got = sorted(pooled[r, c].item() for r, c in grown)
                    assert got == pytest.approx(want, rel=1e-4)
                # the layer equals its dense equivalent
                x = randn(5, m.in_features, seed=step)
                ref = x.double() @ dense_ref(m.values, m.layout).T + m.bias.double()
                torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(m.dense_weight().double(), dense_ref(m.values, m.layout))
            else:
                assert m.weight is values0[i]
                mask = m.mask
                assert int(mask.sum()) == live0[i]
                pruned = old_set & ~mask
                grown = mask & ~old_set
                k = round(zeta * live0[i])
                assert int(pruned.sum()) == int(grown.sum()) == k
                if prune == "magnitude":
                    want = sorted(old_vals[old_set].abs().tolist())[:k]
                    got = sorted(old_vals[pruned].abs().tolist())
                else:
                    want = set_rule_ref(old_vals[old_set].tolist(), k)
                    got = sorted(old_vals[pruned].tolist())
                assert got == pytest.approx(want, abs=0)
                assert not m.weight[~mask].any(), "masked weights must be 0"
                assert not m.weight[grown].any(), "regrown weights start at 0"
                kept = old_set & mask
                assert torch.equal(m.weight[kept], old_vals[kept])
                for key, v in old_state.items():
                    s = opt.state[m.weight][key]
                    assert not s[grown].any(), key
                    assert torch.equal(s[kept], v[kept]), key
                if regrow == "gradient":
                    g = captured[i].abs()
                    want = sorted(g[~old_set].tolist())[-k:]
                    got = sorted(g[grown].tolist())
                    assert got == pytest.approx(want, rel=1e-4)
                x = randn(5, m.in_features, seed=step)
                ref = x.double() @ (m.weight.double() * m.mask).T + m.bias.double()
                torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()
    assert n_updates == 12


def test_masked_sgd_post_hook_rezeroes():
    """With SGD, masked weights and momentum are zeroed again after every optimizer step."""
    model = build("masked", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    evo = sk.SET(model, opt, zeta=0.2, interval=100)  # noqa: F841 (the hook lives as long as evo)
    lin = model[0]
    train_step(model, opt, 1)
    with torch.no_grad():
        lin.weight.add_(1.0)  # pollute masked entries and the momentum buffer
        opt.state[lin.weight]["momentum_buffer"].add_(1.0)
    train_step(model, opt, 2)
    assert not lin.weight[~lin.mask].any()
    assert not opt.state[lin.weight]["momentum_buffer"][~lin.mask].any()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_set_prune_shortfall_moves_to_other_sign(sign):
    """All live weights of one sign: the whole quota comes from that sign (documented rule)."""
    lin = MaskedLinear(40, 30, density=0.5, generator=gen(1))
    with torch.no_grad():
        lin.weight.copy_(sign * (lin.weight.abs() + 1e-3) * lin.mask)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    evo = sk.SET(lin, opt, zeta=0.4, interval=1, prune="set")
    old_mask, old_w = lin.mask.clone(), lin.weight.detach().clone()
    assert evo.step()
    pruned = old_mask & ~lin.mask
    k = round(0.4 * int(old_mask.sum()))
    assert int(pruned.sum()) == k
    want = sorted(old_w[old_mask].abs().tolist())[:k]
    assert sorted(old_w[pruned].abs().tolist()) == want


def test_set_prune_sign_split_counts():
    """Both signs plentiful: k // 2 negatives (closest to 0) and k - k // 2 positives."""
    lin = SparseLinear(128, 128, density=0.5, block_size=16, generator=gen(2))  # 32 of 64 blocks
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    evo = sk.SET(lin, opt, zeta=0.5, interval=1, prune="set")
    old = block_set(lin.layout)
    sums = lin.values.detach().double().sum((1, 2)).tolist()
    evo.step()
    new = set(block_set(lin.layout))
    pruned = [s for blk, s in zip(old, sums) if blk not in new]
    k = round(0.5 * 32)
    assert len(pruned) == k
    assert sum(v < 0 for v in sums) >= k // 2 and sum(v >= 0 for v in sums) >= k - k // 2
    assert sum(v < 0 for v in pruned) == k // 2
    assert sorted(pruned) == pytest.approx(set_rule_ref(sums, k))


def test_gradient_regrow_needs_a_backward_pass():
    lin = MaskedLinear(20, 10, density=0.3, generator=gen(0))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    evo = sk.SET(lin, opt, interval=1, regrow="gradient")
    with pytest.raises(RuntimeError, match="dense gradient"):
        evo.step()


def test_nearly_dense_layer_clamps_k():
    """k is clamped to the empty positions; a full layer does not change."""
    lin = MaskedLinear(10, 10, density=0.9, generator=gen(0))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    evo = sk.SET(lin, opt, zeta=0.5, interval=1)
    old = lin.mask.clone()
    assert evo.step()
    assert int((old & ~lin.mask).sum()) == 10 and int(lin.mask.sum()) == 90
    full = MaskedLinear(10, 10, density=1.0, generator=gen(0))
    evo = sk.SET(full, torch.optim.SGD(full.parameters(), lr=0.1), zeta=0.5, interval=1)
    assert not evo.step()


# --------------------------------------------------------------------------- schedules
def test_cosine_schedule_values_and_counts():
    lin = MaskedLinear(50, 40, density=0.25, generator=gen(0))  # 500 live
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    evo = sk.SET(lin, opt, zeta=0.4, interval=10, schedule="cosine", end_step=100)
    assert evo.zeta_at(0) == pytest.approx(0.4)
    assert evo.zeta_at(50) == pytest.approx(0.2)
    assert evo.zeta_at(25) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert evo.zeta_at(100) == pytest.approx(0.0, abs=1e-12)
    assert evo.zeta_at(130) == 0.0
    moved = {}
    for step in range(1, 121):
        old = lin.mask.clone()
        changed = evo.step()
        n = int((old & ~lin.mask).sum())
        if step % 10 == 0:
            moved[step] = n
        else:
            assert n == 0 and not changed
    for step, n in moved.items():
        assert n == round(evo.zeta_at(step) * 500), step
    assert moved[100] == moved[110] == moved[120] == 0
    assert moved[10] > moved[50] > moved[90] > 0


def test_constant_schedule_stops_after_end_step():
    lin = SparseLinear(64, 64, density=0.5, block_size=16, generator=gen(0))
    evo = sk.SET(lin, torch.optim.SGD(lin.parameters(), lr=0.0), zeta=0.25, interval=2, end_step=4)
    assert [evo.step() for _ in range(8)] == [False, True, False, True, False, False, False, False]


# --------------------------------------------------------------------------- ERK
def test_erk_totals_exact_and_capped():
    shapes = [(1000, 784), (1000, 1000), (1000, 1000), (10, 1000)]
    sizes = [o * i for o, i in shapes]
    for density in (0.01, 0.03, 0.1, 0.5):
        d = layer_densities(shapes, density, "erk")
        assert sum(a * n for a, n in zip(d, sizes)) == pytest.approx(density * sum(sizes), rel=1e-12)
        assert all(0 <= a <= 1 for a in d)
        free = [k for k in range(4) if d[k] < 1]
        raw = [(o + i) / (o * i) for o, i in shapes]
        ratios = [d[k] / raw[k] for k in free]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)  # ER proportionality
    d = layer_densities(shapes, 0.1, "erk")
    assert d[3] == 1.0  # the 10-output layer would exceed 1: dense, budget redistributed
    assert layer_densities(shapes, 0.1, "er") == d
    assert layer_densities(shapes, 1.0, "erk") == pytest.approx([1.0] * 4)
    # sparsify realises them (per-layer rounding only)
    model = torch.nn.Sequential(*[torch.nn.Linear(i, o) for o, i in shapes])
    sk.sparsify(model, density=0.1, block_size=None, distribution="erk")
    live = sum(int(m.mask.sum()) for m in model)
    assert abs(live - 0.1 * sum(sizes)) <= len(shapes)


# --------------------------------------------------------------------------- exact resume
def _resume_model(seed, block_size=16):
    g = gen(seed)
    density = 0.5 if block_size > 1 else 0.2
    return torch.nn.Sequential(MaskedLinear(70, 48, density=0.2, generator=g), torch.nn.ReLU(),
                               SparseLinear(48, 37, density=density, block_size=block_size, generator=g))


@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("optim,regrow,prune", [("sgd", "random", "set"), ("adam", "gradient", "magnitude")])
def test_exact_resume(optim, regrow, prune, block_size):
    def fresh(seed):
        model = _resume_model(seed, block_size)
        opt = make_optimizer(optim, model)
        evo = sk.SET(model, opt, zeta=0.3, interval=3, regrow=regrow, prune=prune, schedule="cosine",
                     end_step=40, seed=11)
        return model, opt, evo

    k, m = 7, 11
    ref_model, ref_opt, ref_evo = fresh(0)
    for step in range(1, k + m + 1):
        train_step(ref_model, ref_opt, step)
        ref_evo.step()

    model, opt, evo = fresh(0)
    for step in range(1, k + 1):
        train_step(model, opt, step)
        evo.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "set": evo.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model2, opt2, evo2 = fresh(99)  # a different initial topology and weights
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    evo2.load_state_dict(saved["set"])
    assert evo2.step_count == k
    for step in range(k + 1, k + m + 1):
        train_step(model2, opt2, step)
        evo2.step()

    ref_sd, sd = ref_model.state_dict(), model2.state_dict()
    assert ref_sd.keys() == sd.keys()
    for key in ref_sd:
        assert torch.equal(ref_sd[key], sd[key]), key
    assert ref_model[2].layout == model2[2].layout
    for p_ref, p in zip(ref_model.parameters(), model2.parameters()):
        for key, v in ref_opt.state[p_ref].items():
            assert torch.equal(v, opt2.state[p][key]), key
    assert evo2.state_dict() == ref_evo.state_dict()


def test_sparse_linear_loads_a_different_layout():
    a = SparseLinear(70, 50, density=0.4, block_size=16, generator=gen(0))
    b = SparseLinear(70, 50, density=0.4, block_size=16, generator=gen(1))
    assert a.layout != b.layout
    b.layout  # cache the old layout
    b.load_state_dict(a.state_dict())
    assert b.layout == a.layout
    x = randn(3, 70)
    torch.testing.assert_close(b(x), a(x))


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(zeta=1.5), "zeta"),
    (dict(zeta=-0.1), "zeta"),
    (dict(interval=0), "interval"),
    (dict(regrow="magic"), "regrow"),
    (dict(prune="random"), "prune"),
    (dict(schedule="linear"), "schedule"),
    (dict(schedule="cosine"), "end_step"),
    (dict(end_step=0), "end_step"),
])
def test_bad_arguments(kwargs, match):
    lin = MaskedLinear(8, 8, density=0.5)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        sk.SET(lin, opt, **kwargs)


def test_model_without_sparse_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model: expected at least one sparse layer"):
        sk.SET(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_bad_types():
    lin = MaskedLinear(8, 8, density=0.5)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model"):
        sk.SET("model", opt)
    with pytest.raises(TypeError, match="optimizer"):
        sk.SET(lin, None)
    with pytest.raises(TypeError, match="interval"):
        sk.SET(lin, opt, interval=2.5)
    with pytest.raises(ValueError, match="state_dict"):
        sk.SET(lin, opt).load_state_dict({"step": 1})


# --------------------------------------------------------------------------- device (GPU only)
@pytest.mark.parametrize("prune,regrow", [("magnitude", "random"), ("set", "gradient")])
def test_block_update_on_cuda_has_no_host_sync(prune, regrow):
    """The SparseLinear update runs on the device without a host synchronisation."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the sync-free path is checked with torch.cuda.set_sync_debug_mode)")
    dev = torch.device("cuda")
    lin = SparseLinear(200, 150, density=0.3, block_size=16, device=dev, backend="torch")
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    evo = sk.SET(lin, opt, zeta=0.3, interval=1, prune=prune, regrow=regrow)
    x = torch.randn(8, 200, device=dev)
    lin(x).square().mean().backward()
    opt.step()
    lin.layout  # build the cached layout outside the checked region
    old = block_set(lin.layout)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert evo.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check_layout(lin.layout)
    assert len(block_set(lin.layout)) == len(old) and block_set(lin.layout) != old


@pytest.mark.parametrize("kind", ["element", "block"])
@pytest.mark.parametrize("regrow,prune,optim", [("random", "magnitude", "sgd"), ("gradient", "set", "adam")])
def test_cpu_index_kernels_give_the_torch_path_results(monkeypatch, kind, regrow, prune, optim):
    """On the CPU the SET update merges the kept and regrown positions and builds the layout index
    with numba passes instead of torch sorts; training through many updates must give exactly the
    layouts, weights and optimizer state of the torch-only path."""
    import set_kernels.layout as layout_mod
    from set_kernels.backends import numba as nb

    if nb.index_kernels() is None:
        pytest.skip(nb.availability()[1])

    selects = []  # the radix select of magnitude pruning: whether it could answer
    kernels = nb.index_kernels()
    smallest_k = kernels.smallest_k
    monkeypatch.setattr(kernels, "smallest_k", lambda *a: selects.append(smallest_k(*a)) or selects[-1])

    def run(use_numba):
        monkeypatch.setattr(layout_mod, "USE_NUMBA_INDEX", use_numba)
        model = build(kind, seed=4)
        opt = make_optimizer(optim, model)
        evo = sk.SET(model, opt, zeta=0.3, interval=2, prune=prune, regrow=regrow, seed=6)
        layouts = []
        for step in range(1, 13):
            train_step(model, opt, step)
            evo.step()
            layouts.append([m.layout.index.clone() for m in model if isinstance(m, SparseLinear)])
        return model, opt, layouts

    (m1, o1, l1), (m2, o2, l2) = run(True), run(False)
    if prune == "magnitude":  # the numba run pruned through the radix select (every update but ties)
        assert len(selects) == 6 * 2 and any(selects)
    else:
        assert not selects
    assert len(l1) == len(l2) and all(torch.equal(a, b) for x, y in zip(l1, l2) for a, b in zip(x, y))
    assert any(not torch.equal(a, b) for a, b in zip(l1[0], l1[-1])), "the topology must have changed"
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for key, v in o1.state[p1].items():
            assert torch.equal(v, o2.state[p2][key]), key
