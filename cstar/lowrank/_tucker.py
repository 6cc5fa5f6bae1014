"""Tucker-2 and SVD factorisation and projection, from eigendecompositions of small Gram matrices.

A conv kernel W (C_out, C_in, kh, kw) has a mode-0 unfolding (C_out, C_in*kh*kw)
and a mode-1 unfolding (C_in, C_out*kh*kw). Their leading left singular vectors
are the leading eigenvectors of the C x C Gram matrices ``A @ A.T``, which
``torch.linalg.eigh`` finds far faster than an SVD of the wide unfolding; the
eigenvalues are the squared singular values.

Tucker-2 keeps the spatial modes: ``W ~= core x0 u_out x1 u_in`` with core
(r_out, r_in, kh, kw), u_out (C_out, r_out), u_in (C_in, r_in), orthonormal
columns. The truncated HOSVD is the starting point; ``n_iter`` HOOI sweeps refine
it. Everything runs on the weight's device, in float32 or float64; float16 and
bfloat16 weights are computed in float32 and the results cast back.
"""

from __future__ import annotations

import numbers

import torch

from .._core.errors import CstarError

# Gram matrices of more than _GRAM_TRIANGLE_FROM rows, for a spectrum only, are built as their lower triangle
# (_lower_gram) in blocks of _GRAM_BLOCK rows: a 4096-row one in 60% of the time of the full product. Smaller
# ones keep the full product, so every layer up to that width gets the very same spectrum as before.
_GRAM_BLOCK = 512
_GRAM_TRIANGLE_FROM = 1024


def _compute_dtype(weight: torch.Tensor, what: str) -> torch.dtype:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise CstarError(f"{what} must be a floating-point tensor, got {kind}; pass a layer's weight")
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_kernel(weight: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(weight, "a conv kernel")
    if weight.dim() != 4:
        raise CstarError(
            f"a conv kernel must be 4-D (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}; "
            "use svd_factors/svd_project for a linear weight"
        )
    return weight.detach().to(dtype)


def _check_rank(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CstarError(f"{what} must be an integer >= 1, got {value!r}; pass a positive rank")
    return int(value)


def _check_ranks(ranks: object, shape: torch.Size) -> tuple[int, int]:
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise CstarError(f"Tucker-2 ranks must be a pair (r_out, r_in), got {ranks!r}")
    r_out, r_in = _check_rank("r_out", ranks[0]), _check_rank("r_in", ranks[1])
    return min(r_out, shape[0]), min(r_in, shape[1])


def _check_n_iter(n_iter: object) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 0:
        raise CstarError(f"n_iter (HOOI sweeps) must be an integer >= 0, got {n_iter!r}")
    return int(n_iter)


def _gram(unfolded: torch.Tensor) -> torch.Tensor:
    """``A @ A.T`` of a (C, M) matrix (``eigh`` reads its lower triangle only)."""
    return unfolded @ unfolded.T


def _lower_gram(unfolded: torch.Tensor, block: int) -> torch.Tensor:
    """The lower triangle of ``A @ A.T`` of a (C, M) matrix, upper triangle zero beyond the diagonal blocks:
    all that ``eigvalsh`` reads, one block of ``block`` rows at a time, in about half the multiplications."""
    size = unfolded.shape[0]
    gram = unfolded.new_zeros(size, size)
    for start in range(0, size, block):
        stop = min(start + block, size)
        gram[start:stop, :stop] = unfolded[start:stop] @ unfolded[:stop].T
    return gram


def _top_eigvecs(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors (C, rank) of a symmetric (C, C) matrix, largest first."""
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(1)


def _fix_signs(factor: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each one's largest-magnitude entry is positive (first one on ties)."""
    rows = factor.abs().argmax(dim=0)
    signs = torch.sign(factor[rows, torch.arange(factor.shape[1], device=factor.device)])
    return factor * torch.where(signs == 0, torch.ones_like(signs), signs)


def _unfold_in(weight: torch.Tensor) -> torch.Tensor:
    """Mode-1 unfolding (C_in, C_out*kh*kw)."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1)


def _core(weight: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``weight x0 u_out.T x1 u_in.T``: (r_out, r_in, kh, kw)."""
    c_out, c_in, kh, kw = weight.shape
    reduced = (u_out.T @ weight.reshape(c_out, -1)).reshape(-1, c_in, kh * kw)  # (r_out, C_in, k)
    return torch.einsum("aik,ib->abk", reduced, u_in).reshape(u_out.shape[1], u_in.shape[1], kh, kw)


def _expand(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``core x0 u_out x1 u_in``: (C_out, C_in, kh, kw)."""
    r_out, r_in, kh, kw = core.shape
    inner = torch.einsum("abk,ib->aik", core.reshape(r_out, r_in, kh * kw), u_in)  # (r_out, C_in, k)
    return (u_out @ inner.reshape(r_out, -1)).reshape(u_out.shape[0], u_in.shape[0], kh, kw)


def _factors(weight: torch.Tensor, r_out: int, r_in: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HOSVD factors of ``weight`` refined by ``n_iter`` HOOI sweeps (signs not fixed)."""
    c_out, c_in, kh, kw = weight.shape
    u_out = _top_eigvecs(_gram(weight.reshape(c_out, -1)), r_out)
    u_in = _top_eigvecs(_gram(_unfold_in(weight)), r_in)
    for _ in range(n_iter):
        # weight x1 u_in.T, unfolded on mode 0: (C_out, r_in*k)
        partial = torch.einsum("oik,ib->obk", weight.reshape(c_out, c_in, kh * kw), u_in).reshape(c_out, -1)
        u_out = _top_eigvecs(_gram(partial), r_out)
        # weight x0 u_out.T, unfolded on mode 1: (C_in, r_out*k)
        partial = (u_out.T @ weight.reshape(c_out, -1)).reshape(r_out, c_in, kh * kw)
        u_in = _top_eigvecs(_gram(partial.transpose(0, 1).reshape(c_in, -1)), r_in)
    return u_out, u_in


def mode_spectra(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values of the two channel unfoldings of a conv kernel.

    ``weight`` (C_out, C_in, kh, kw) -> ``(eig_out, eig_in)`` of lengths C_out and
    C_in, descending and >= 0: the eigenvalues of the Gram matrices of the mode-0
    and mode-1 unfoldings. Returned in float64 for a float64 weight, else float32
    (half-precision weights are not cast back: squared values overflow float16).
    """
    weight = _check_kernel(weight)
    spectra = []
    for unfolded in (weight.reshape(weight.shape[0], -1), _unfold_in(weight)):
        values = torch.linalg.eigvalsh(_gram(unfolded))
        spectra.append(values.flip(0).clamp_min(0))
    return spectra[0], spectra[1]


def singular_energies(matrix: torch.Tensor) -> torch.Tensor:
    """Squared singular values of a 2-D ``matrix`` (M, N), descending and >= 0: min(M, N) of them.

    Only the Gram matrix of the smaller side is formed (min(M, N)^2 entries), so a
    25088 x 4096 classifier costs a 4096 x 4096 eigenproblem; above 1024 rows only
    its lower triangle (what ``eigvalsh`` reads). float64 for a float64 matrix,
    else float32; up to 1024 rows equal to the shorter of :func:`mode_spectra`.
    """
    work = _check_kernel(matrix[:, :, None, None])[:, :, 0, 0]
    side = work if work.shape[0] <= work.shape[1] else work.T
    gram = _lower_gram(side, _GRAM_BLOCK) if side.shape[0] > _GRAM_TRIANGLE_FROM else _gram(side)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def core_energies(weight: torch.Tensor) -> torch.Tensor:
    """The energy of every block of the core in the full HOSVD bases of a conv kernel.

    ``weight`` (C_out, C_in, kh, kw) -> (C_out, C_in), float64, entry ``(j, k)``
    ``||core[j, k]||^2`` for ``core = weight x0 u_out.T x1 u_in.T`` with the full
    (descending) eigenbases of both unfoldings: the energy of output-mode
    component j with input-mode component k. They sum to ``||weight||^2``.
    """
    work = _check_kernel(weight)
    c_out, c_in = work.shape[:2]
    u_out, u_in = _factors(work, c_out, c_in, 0)
    return _core(work, u_out, u_in).double().square().sum((2, 3))


def energy_table(blocks: torch.Tensor) -> torch.Tensor:
    """Share of the total of ``blocks`` (C_out, C_in) in each leading (r_out, r_in) corner, at every rank pair.

    -> (C_out + 1, C_in + 1), float64: ``E[r_out, r_in] = blocks[:r_out, :r_in].sum() / blocks.sum()``;
    rows and columns 0 are 0 (all ones when the blocks sum to 0).
    """
    table = torch.zeros(blocks.shape[0] + 1, blocks.shape[1] + 1, dtype=torch.float64, device=blocks.device)
    table[1:, 1:] = blocks.double().cumsum(0).cumsum(1)
    total = table[-1, -1].clone()
    return table / total if total > 0 else torch.ones_like(table)


def hosvd_energy(weight: torch.Tensor) -> torch.Tensor:
    """Share of ``||weight||^2`` that the truncated HOSVD keeps, at every pair of ranks.

    ``weight`` (C_out, C_in, kh, kw) -> E (C_out + 1, C_in + 1), float64, with
    ``E[r_out, r_in] = ||core[:r_out, :r_in]||^2 / ||weight||^2`` for the core in
    the full (descending) eigenbases of both unfoldings: exactly the energy kept
    by ``tucker2_project(weight, (r_out, r_in))``. Rows and columns 0 are 0 and
    ``E[C_out, C_in] = 1`` (all ones for a zero kernel). It is
    ``energy_table(core_energies(weight))``.
    """
    return energy_table(core_energies(weight))


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], n_iter: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 factors ``(core, u_out, u_in)`` of a conv kernel at ``ranks = (r_out, r_in)``.

    ``weight`` (C_out, C_in, kh, kw) ~= ``core x0 u_out x1 u_in`` with core
    (r_out, r_in, kh, kw), u_out (C_out, r_out), u_in (C_in, r_in). Truncated
    HOSVD, then ``n_iter`` HOOI sweeps (default 0). Ranks above a mode's size are
    clipped to it (the factorisation is then exact in that mode). Each factor
    column's largest-magnitude entry is positive, so equal inputs give equal
    factors. Results have the weight's dtype and device.
    """
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    work = _check_kernel(weight)
    r_out, r_in = _check_ranks(ranks, work.shape)
    u_out, u_in = _factors(work, r_out, r_in, _check_n_iter(n_iter))
    u_out, u_in = _fix_signs(u_out), _fix_signs(u_in)
    core = _core(work, u_out, u_in)
    return core.to(dtype), u_out.to(dtype), u_in.to(dtype)


def tucker2_project(weight: torch.Tensor, ranks: tuple[int, int], n_iter: int = 0) -> torch.Tensor:
    """The nearest kernel of Tucker-2 ranks ``(r_out, r_in)`` found by HOSVD (+ ``n_iter`` HOOI sweeps).

    Returns ``core x0 u_out x1 u_in`` with the shape, dtype and device of
    ``weight`` (C_out, C_in, kh, kw): the Z-step of ADMM.
    """
    work = _check_kernel(weight)
    r_out, r_in = _check_ranks(ranks, work.shape)
    u_out, u_in = _factors(work, r_out, r_in, _check_n_iter(n_iter))
    return _expand(_core(work, u_out, u_in), u_out, u_in).to(weight.dtype)


def _check_matrix(matrix: torch.Tensor, what: str) -> torch.Tensor:
    dtype = _compute_dtype(matrix, what)
    if matrix.dim() != 2:
        raise CstarError(f"{what} must be 2-D (out, in), got shape {tuple(matrix.shape)}")
    return matrix.detach().to(dtype)


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (Eckart-Young) of ``matrix`` (out, in): ``matrix ~= u @ v``.

    u (out, r), v (r, in) with r = min(rank, out, in); the singular values are
    split as square roots into both factors. Computed from the eigenvectors of
    the smaller Gram matrix; dtype and device of ``matrix``.
    """
    dtype = matrix.dtype if isinstance(matrix, torch.Tensor) else None
    work = _check_matrix(matrix, "an SVD input")
    rank = min(_check_rank("rank", rank), *work.shape)
    wide = work.shape[0] <= work.shape[1]
    side = work if wide else work.T  # (short, long)
    q = _fix_signs(_top_eigvecs(_gram(side), rank))
    scaled = q.T @ side  # row i = s_i * v_i
    sqrt_s = scaled.norm(dim=1).sqrt()
    safe = torch.where(sqrt_s > 0, sqrt_s, torch.ones_like(sqrt_s))
    left, right = q * sqrt_s, scaled / safe[:, None]
    u, v = (left, right) if wide else (right.T, left.T)
    return u.to(dtype), v.to(dtype)


def svd_project(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a linear weight (out, in) or a 1x1 kernel (out, in, 1, 1).

    Same shape, dtype and device as ``weight``.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise CstarError(
                f"svd_project takes a 1x1 kernel, got shape {tuple(weight.shape)}; use tucker2_project for k x k"
            )
        return svd_project(weight[:, :, 0, 0], rank)[:, :, None, None]
    work = _check_matrix(weight, "a linear weight")
    rank = min(_check_rank("rank", rank), *work.shape)
    wide = work.shape[0] <= work.shape[1]
    side = work if wide else work.T
    q = _top_eigvecs(_gram(side), rank)
    projected = q @ (q.T @ side)
    # contiguous: a transposed view cannot be broadcast over NCCL (ADMM sends its Z to every rank)
    return (projected if wide else projected.T).to(weight.dtype).contiguous()
