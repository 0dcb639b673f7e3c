"""The numba-drawn Dropout used by set-kernels train: nn.Dropout's semantics, seeded by torch."""
from __future__ import annotations

import pytest
import torch

from set_kernels.nn.dropout import Dropout


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_rate_scale_and_gradient(p, dtype):
    x = (torch.rand(300, 1000, dtype=dtype) + 0.5).requires_grad_()  # never 0
    y = Dropout(p)(x)
    kept = y != 0
    rate = kept.double().mean().item()
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 6 * sd, rate
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept / (1 - p))


def test_seeded_by_torch_and_fresh_per_call():
    x = torch.ones(40, 1000)
    d = Dropout(0.2)
    torch.manual_seed(3)
    a, b = d(x), d(x)
    torch.manual_seed(3)
    assert torch.equal(d(x), a)
    assert not torch.equal(a, b), "two calls must draw two masks"
    # neighbouring elements and rows are not correlated (the hash is per element)
    m = (a != 0).double()
    assert abs(torch.corrcoef(torch.stack([m[:, :-1].reshape(-1), m[:, 1:].reshape(-1)]))[0, 1]) < 0.03


def test_eval_identity_and_fallbacks():
    d = Dropout(0.3).eval()
    x = torch.randn(5, 7)
    assert d(x) is x
    d.train()
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    xb = x.to(torch.bfloat16)
    y = d(xb)  # no numba kernel for bf16: F.dropout, same semantics
    kept = y != 0
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y[kept].float(), xb[kept].float() / 0.7, rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="^p: "):
        Dropout(1.5)
