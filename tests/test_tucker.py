import numpy as np
import pytest
import torch

from cstar._core.errors import CstarError
from cstar.lowrank import mode_spectra, svd_factors, svd_project, tucker2, tucker2_project
from cstar.lowrank._tucker import hosvd_energy


def _kernel(c_out=12, c_in=10, k=3, dtype=torch.float64, seed=0):
    """A kernel with a decaying spectrum in both channel modes (distinct singular values)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    scale_out = 0.7 ** torch.arange(c_out, dtype=torch.float64)
    scale_in = 0.8 ** torch.arange(c_in, dtype=torch.float64)
    return (base * scale_out[:, None, None, None] * scale_in[None, :, None, None]).to(dtype)


# --- numpy reference (SVD of the unfoldings, written independently of the package) ---

def _np_unfold(w, mode):
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def _np_leading(matrix, rank):
    return np.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


def _np_tucker2(w, r_out, r_in, n_iter=0):
    u_out, u_in = _np_leading(_np_unfold(w, 0), r_out), _np_leading(_np_unfold(w, 1), r_in)
    for _ in range(n_iter):
        u_out = _np_leading(_np_unfold(np.einsum("oihw,ib->obhw", w, u_in), 0), r_out)
        u_in = _np_leading(_np_unfold(np.einsum("oihw,oa->aihw", w, u_out), 1), r_in)
    core = np.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
    return np.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


def _np_expand(core, u_out, u_in):
    return np.einsum("abhw,oa,ib->oihw", core.numpy(), u_out.numpy(), u_in.numpy())


def test_tucker2_reconstruction_equals_numpy_hosvd():
    w = _kernel()
    core, u_out, u_in = tucker2(w, (5, 4))
    assert core.shape == (5, 4, 3, 3) and u_out.shape == (12, 5) and u_in.shape == (10, 4)
    reference = _np_tucker2(w.numpy(), 5, 4)
    np.testing.assert_allclose(_np_expand(core, u_out, u_in), reference, atol=1e-10)


@pytest.mark.parametrize("n_iter", [1, 3])
def test_hooi_reconstruction_equals_numpy_hooi(n_iter):
    w = _kernel(seed=1)
    projected = tucker2_project(w, (4, 3), n_iter=n_iter)
    np.testing.assert_allclose(projected.numpy(), _np_tucker2(w.numpy(), 4, 3, n_iter), atol=1e-9)


def test_hooi_error_never_above_hosvd():
    w = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = [float((tucker2_project(w, (5, 5), n_iter=n) - w).norm()) for n in (0, 1, 2, 4)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_full_rank_is_exact_in_float32():
    w = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(3))
    core, u_out, u_in = tucker2(w, (8, 6))
    torch.testing.assert_close(torch.from_numpy(_np_expand(core, u_out, u_in)), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tucker2_project(w, (8, 6)), w, atol=1e-5, rtol=1e-5)


def test_ranks_above_mode_size_are_clipped():
    w = _kernel(6, 4)
    core, u_out, u_in = tucker2(w, (100, 50))
    assert core.shape == (6, 4, 3, 3) and u_out.shape == (6, 6) and u_in.shape == (4, 4)
    torch.testing.assert_close(tucker2_project(w, (100, 50)), w)


def test_rank_one_equals_numpy():
    w = _kernel(seed=4)
    core, u_out, u_in = tucker2(w, (1, 1))
    assert core.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(_np_expand(core, u_out, u_in), _np_tucker2(w.numpy(), 1, 1), atol=1e-10)


def test_factors_are_orthonormal_with_deterministic_signs():
    w = _kernel(seed=5)
    core, u_out, u_in = tucker2(w, (6, 5))
    for u in (u_out, u_in):
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype))
        largest = u.gather(0, u.abs().argmax(0, keepdim=True))
        assert (largest > 0).all()
    again = tucker2(w.clone(), (6, 5))
    assert all(torch.equal(a, b) for a, b in zip((core, u_out, u_in), again))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_and_out_computed_in_float32(dtype):
    w = _kernel(dtype=torch.float32).to(dtype)
    core, u_out, u_in = tucker2(w, (5, 4))
    projected = tucker2_project(w, (5, 4))
    assert {core.dtype, u_out.dtype, u_in.dtype, projected.dtype} == {dtype}
    reference = tucker2_project(w.float(), (5, 4))
    torch.testing.assert_close(projected.float(), reference.to(dtype).float())


def test_float64_path_keeps_precision():
    w = _kernel()
    projected = tucker2_project(w, (12, 10))
    assert projected.dtype == torch.float64
    assert float((projected - w).abs().max()) < 1e-12


def test_tucker2_project_equals_expanded_factors():
    w = _kernel(seed=6)
    core, u_out, u_in = tucker2(w, (7, 3), n_iter=2)
    np.testing.assert_allclose(tucker2_project(w, (7, 3), n_iter=2).numpy(), _np_expand(core, u_out, u_in), atol=1e-10)


def test_mode_spectra_are_squared_singular_values_of_unfoldings():
    w = _kernel(seed=7)
    eig_out, eig_in = mode_spectra(w)
    for spectrum, mode in ((eig_out, 0), (eig_in, 1)):
        expected = np.linalg.svd(_np_unfold(w.numpy(), mode), compute_uv=False) ** 2
        np.testing.assert_allclose(spectrum.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_hosvd_energy_is_the_retained_share_of_the_projection():
    w = _kernel(seed=8)
    table = hosvd_energy(w)
    assert table.shape == (13, 11) and float(table[12, 10]) == pytest.approx(1.0)
    total = float((w ** 2).sum())
    for r_out, r_in in ((1, 1), (3, 7), (12, 2)):
        kept = float((torch.from_numpy(_np_tucker2(w.numpy(), r_out, r_in)) ** 2).sum()) / total
        assert float(table[r_out, r_in]) == pytest.approx(kept, rel=1e-9)


@pytest.mark.parametrize("shape", [(9, 14), (14, 9)])
def test_svd_factors_error_is_the_eckart_young_optimum(shape):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u, v = svd_factors(m, 4)
    assert u.shape == (shape[0], 4) and v.shape == (4, shape[1])
    singular = np.linalg.svd(m.numpy(), compute_uv=False)
    assert float(((u @ v - m) ** 2).sum()) == pytest.approx(float((singular[4:] ** 2).sum()), rel=1e-9)
    np.testing.assert_allclose(u.norm(dim=0).numpy(), np.sqrt(singular[:4]), rtol=1e-9)
    np.testing.assert_allclose(v.norm(dim=1).numpy(), np.sqrt(singular[:4]), rtol=1e-9)


def test_svd_factors_of_rank_deficient_matrix_are_finite():
    m = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 5.0))
    u, v = svd_factors(m, 3)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    torch.testing.assert_close(u @ v, m)


def test_svd_project_linear_and_pointwise_kernel():
    m = torch.randn(10, 7, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    u, v = svd_factors(m, 3)
    torch.testing.assert_close(svd_project(m, 3), u @ v)
    projected = svd_project(m[:, :, None, None], 3)
    assert projected.shape == (10, 7, 1, 1)
    torch.testing.assert_close(projected[:, :, 0, 0], u @ v)
    assert svd_project(m.half(), 3).dtype == torch.float16


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tucker2(torch.randn(4, 4), (2, 2)), "4-D"),
        (lambda: tucker2(torch.randn(4, 4, 3, 3), (0, 2)), "r_out must be an integer >= 1"),
        (lambda: tucker2(torch.randn(4, 4, 3, 3), 2), "pair"),
        (lambda: tucker2(torch.randn(4, 4, 3, 3), (2, 2), n_iter=-1), "n_iter"),
        (lambda: tucker2_project(torch.ones(4, 4, 3, 3, dtype=torch.int64), (2, 2)), "floating-point"),
        (lambda: mode_spectra(torch.randn(4, 4, 3)), "4-D"),
        (lambda: svd_factors(torch.randn(4, 4, 3), 2), "2-D"),
        (lambda: svd_factors(torch.randn(4, 4), 0), "rank must be an integer >= 1"),
        (lambda: svd_project(torch.randn(4, 4, 3, 3), 2), "1x1"),
    ],
)
def test_bad_inputs_raise_cstar_error(call, message):
    with pytest.raises(CstarError, match=message):
        call()


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40)])
def test_singular_energies_are_the_squared_singular_values_from_the_smaller_gram_alone(shape):
    from cstar.lowrank._tucker import singular_energies

    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    energies = singular_energies(matrix)
    assert energies.shape == (min(shape),)
    reference = torch.linalg.svdvals(matrix.double()) ** 2  # independent: an SVD in float64
    assert torch.allclose(energies.double(), reference, rtol=1e-4, atol=1e-3)
    # the very numbers rank selection used before (both Gram matrices, the shorter spectrum kept)
    assert torch.equal(energies, min(mode_spectra(matrix[:, :, None, None]), key=len))


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40)])
def test_singular_energies_from_the_lower_triangle_equal_numpy(monkeypatch, shape, dtype, rtol):
    import cstar.lowrank._tucker as tucker

    monkeypatch.setattr(tucker, "_GRAM_TRIANGLE_FROM", 8)  # the path of wide layers, in uneven blocks of 7 rows
    monkeypatch.setattr(tucker, "_GRAM_BLOCK", 7)
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = np.linalg.svd(matrix.numpy(), compute_uv=False) ** 2  # independent: numpy's SVD in float64
    energies = tucker.singular_energies(matrix.to(dtype))
    assert energies.dtype == dtype
    np.testing.assert_allclose(energies.double().numpy(), expected, rtol=rtol, atol=rtol * expected[0])


def test_lower_gram_holds_the_lower_triangle_of_the_gram_matrix():
    from cstar.lowrank._tucker import _lower_gram

    matrix = np.random.default_rng(2).standard_normal((23, 40))
    gram = _lower_gram(torch.from_numpy(matrix), 5).numpy()
    np.testing.assert_allclose(np.tril(gram), np.tril(matrix @ matrix.T), rtol=1e-12, atol=1e-12)
    assert not np.triu(gram, 5).any()  # above the diagonal blocks nothing is computed
