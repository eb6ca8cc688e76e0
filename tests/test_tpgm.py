import pytest
import torch

from rftbench.methods.tpgm import EPS, clip_radius_, deviation_norms, project_tensor


def test_mars_closed_form_rows_inside_untouched_outside_scaled():
    w0 = torch.zeros(2, 3)
    w = torch.tensor([[1.0, -1.0, 0.5], [0.1, 0.2, -0.1]])  # row L1 norms 2.5 and 0.4
    r = torch.tensor([1.0])
    out = project_tensor(w, w0, r, "mars")
    torch.testing.assert_close(out[0], w[0] * (1.0 / (2.5 + EPS)))
    torch.testing.assert_close(out[1], w[1])  # inside the ball
    assert out.abs().sum(1).max() <= 1.0 + 1e-6


def test_l2_closed_form():
    w0 = torch.ones(4)
    w = w0 + torch.tensor([3.0, 4.0, 0.0, 0.0])  # L2 deviation 5
    r = torch.tensor([2.0])
    out = project_tensor(w, w0, r, "l2")
    torch.testing.assert_close(out, w0 + (w - w0) * 2.0 / (5.0 + EPS))
    inside = project_tensor(w, w0, torch.tensor([4.99]), "l2")
    assert torch.linalg.vector_norm(inside - w0) <= 4.99 + 1e-5


def test_radius_clip_range():
    w0, w = torch.zeros(3, 2), torch.tensor([[1.0, 1.0], [0.5, 0.0], [3.0, 0.0]])
    n = deviation_norms(w, w0, "mars")
    assert clip_radius_(torch.tensor([-2.0]), n).item() == pytest.approx(EPS)
    assert clip_radius_(torch.tensor([10.0]), n).item() == pytest.approx(3.0)
    assert clip_radius_(torch.tensor([1.5]), n).item() == pytest.approx(1.5)
    r = torch.tensor([7.0])
    project_tensor(w, w0, r, "l2")
    assert EPS <= r.item() <= float(deviation_norms(w, w0, "l2")) + 1e-6


@pytest.mark.parametrize("norm", ["mars", "l2"])
def test_radius_gradient_matches_finite_differences(norm):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    w = w0 + torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    n = deviation_norms(w, w0, norm)
    # mars: between the smallest and largest row norm (some rows scaled); l2: half the norm; no kink
    r = ((n.min() + n.max()) / 2 + 0.013 if norm == "mars" else n / 2).reshape(1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda rr: project_tensor(w, w0, rr, norm), (r,))
