"""pytest-benchmark suite: block_sparse_linear (forward, forward+backward) and masked_adam_: the
cases and callables of ``set-kernels bench`` (:func:`set_kernels.bench.run.plan`; element
sparsity included), one pytest-benchmark group per case and pass, its members the backends,
``dense`` and ``torch_bsr``. Usage and environment: benchmarks/README.md and ``_suite.py``.
"""
from __future__ import annotations

from _suite import case_params, run_case

OPS = {"test_block_sparse_linear": "block_sparse_linear", "test_masked_adam": "masked_adam_"}


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case,pass_,impl", case_params(metafunc.config, OPS[metafunc.function.__name__]))


def test_block_sparse_linear(benchmark, case, pass_, impl):
    run_case(benchmark, case, pass_, impl)


def test_masked_adam(benchmark, case, pass_, impl):
    run_case(benchmark, case, pass_, impl)
