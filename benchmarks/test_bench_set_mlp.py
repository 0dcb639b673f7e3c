"""pytest-benchmark suite: one SET-MLP training step (784-1000-1000-1000-10, SparseLinear layers at
densities 0.03 and 0.1, block 16 and element sparsity; on the full grid also the scale case)
against the dense MLP, on the device at hand: the cases of ``set-kernels bench``.

    pytest benchmarks/test_bench_set_mlp.py --benchmark-only

Members of each group: ``<backend>`` (forward, cross-entropy, backward, ``MaskedAdam.step()``),
``<backend>/set_update`` (one SET topology update; divide by the interval, 100 by default, for
its amortised share of a step, as ``set-kernels bench`` does), and ``dense``
(``nn.Linear`` layers with ``torch.optim.Adam(fused=True)``; skipped in the scale case).
"""
from __future__ import annotations

from _suite import case_params, run_case


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case,pass_,impl", case_params(metafunc.config, "set_mlp_step"))


def test_set_mlp_step(benchmark, case, pass_, impl):
    run_case(benchmark, case, pass_, impl)
