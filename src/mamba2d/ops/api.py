"""``selective_scan_2d``: argument checks and backend dispatch.

Backends:
- ``"reference"``: the definition in float64 loops (tests only; slow).
- ``"torch"``: vectorised PyTorch with a hand-written backward; any device.
- ``"cpu"``: numba-compiled kernels, forward and backward; CPU tensors (needs numba).
- ``"triton"``: fused Triton kernels, forward and backward; CUDA tensors.
- ``"auto"``: Triton for CUDA tensors, ``"cpu"`` for CPU tensors when numba imports, else PyTorch.
  A grid of one row or one column on CUDA runs the chunked 1D kernel (``mamba2d.ops.scan1d_triton``).
"""

from __future__ import annotations

import functools

import torch

from mamba2d.ops.layout import ScanLayout

BACKENDS = ("auto", "reference", "torch", "cpu", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, ndims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but u is on {device}")
    return t


@functools.cache
def _numba_import_error() -> str:
    try:
        import numba  # noqa: F401
    except ImportError as e:
        return f"numba does not import ({e}); pip install numba"
    return ""


def cpu_available(u: torch.Tensor) -> tuple[bool, str]:
    """Whether the numba CPU kernels can run on ``u``, and why not."""
    if u.device.type != "cpu":
        return False, f"tensors are on {u.device}; the numba kernels need CPU tensors"
    why = _numba_import_error()
    return not why, why


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {meaning} = {shape}, got {tuple(t.shape)}")


def _grouped(name: str, t: torch.Tensor, batch: int, dim: int, length: int) -> torch.Tensor:
    """Return B or C as (batch, groups, dstate, L), checking the group count divides dim."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    b, groups, _, tl = t.shape
    if b != batch:
        raise ValueError(f"{name} has batch {b} but u has batch {batch}")
    if tl != length:
        raise ValueError(f"{name} has {tl} tokens in its last dimension but u has L = {length}")
    if groups < 1 or dim % groups != 0:
        raise ValueError(f"{name} has {groups} groups, which does not divide dim = {dim}")
    return t


def check_scan_args(u, delta, A, B, C, D, z, delta_bias, backend: str):
    """Check the tensor arguments shared by the 1D and 2D scans and the backend name.

    Returns them with B and C as (batch, groups, dstate, L); raises ValueError naming the argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = u.device if isinstance(u, torch.Tensor) else torch.device("cpu")
    u = _check_tensor("u", u, (3,), device)
    batch, dim, length = u.shape
    delta = _check_tensor("delta", delta, (3,), device)
    _check_shape("delta", delta, (batch, dim, length), "(batch, dim, L)")
    if delta.dtype != u.dtype:
        raise ValueError(f"delta has dtype {delta.dtype} but u has {u.dtype}; they must match")
    A = _check_tensor("A", A, (2,), device)
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, dstate) with dim = {dim}, got {tuple(A.shape)}")
    dstate = A.shape[1]
    if dstate < 1:
        raise ValueError("A must have at least one state (dstate >= 1)")
    B = _grouped("B", _check_tensor("B", B, (3, 4), device), batch, dim, length)
    C = _grouped("C", _check_tensor("C", C, (3, 4), device), batch, dim, length)
    for name, t in (("B", B), ("C", C)):
        if t.shape[2] != dstate:
            raise ValueError(f"{name} has dstate {t.shape[2]} but A has dstate {dstate}")
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B has {B.shape[1]} groups but C has {C.shape[1]}; they must match")
    if D is not None:
        D = _check_tensor("D", D, (1,), device)
        _check_shape("D", D, (dim,), "(dim,)")
    if delta_bias is not None:
        delta_bias = _check_tensor("delta_bias", delta_bias, (1,), device)
        _check_shape("delta_bias", delta_bias, (dim,), "(dim,)")
    if z is not None:
        z = _check_tensor("z", z, (3,), device)
        _check_shape("z", z, (batch, dim, length), "(batch, dim, L)")
        if z.dtype != u.dtype:
            raise ValueError(f"z has dtype {z.dtype} but u has {u.dtype}; they must match")
    return u, delta, A, B, C, D, z, delta_bias


def one_line_reverse(layout: ScanLayout) -> bool | None:
    """For a grid of one row (one column), the 1D scan it amounts to runs backwards iff
    ``flip_h`` (``flip_v``); None for any other grid. The other pass has one cell per line and
    leaves the state unchanged, whichever order the passes run in."""
    if layout.height == 1:
        return layout.flip_h
    if layout.width == 1:
        return layout.flip_v
    return None


def _route_1d(u: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` sends one-line grids to the 1D Triton kernel (CUDA tensors)."""
    if not u.is_cuda:
        return False
    from mamba2d.ops.scan_triton import triton_available

    return triton_available(u)[0]


def selective_scan_2d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    height: int,
    width: int,
    flip_h: bool = False,
    flip_v: bool = False,
    transpose: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The 2D selective scan of 2DMamba, differentiable in every tensor argument.

    Shapes (the grid is flattened row-major, L = height * width, token l = i * width + j):

    - ``u``, ``delta``, ``z``: (batch, dim, L)
    - ``A``: (dim, dstate), real (negative in practice)
    - ``B``, ``C``: (batch, dstate, L), or grouped (batch, groups, dstate, L); channel c uses
      group ``c // (dim // groups)``
    - ``D``, ``delta_bias``: (dim,)

    Per batch b, channel c, state n and cell (i, j), with Δ = softplus?(delta + delta_bias):
    ``Ā = exp(Δ A[c, n])``, ``X = Δ B[n] u``; a horizontal pass ``g[i,j] = Ā g[i,j-1] + X``;
    a vertical pass on g ``h[i,j] = Ā h[i-1,j] + g[i,j]``; ``y = Σ_n C[n] h + D u``; and
    ``out = y * silu(z)`` when z is given. ``flip_h`` / ``flip_v`` reverse the horizontal /
    vertical passes, ``transpose`` runs the vertical pass first. With height = 1 this is Mamba's
    1D selective scan.

    Returns (batch, dim, L) in ``u``'s dtype. State and accumulation are float32 (float64 for
    float64 inputs on the torch, cpu and reference backends).
    """
    u, delta, A, B, C, D, z, delta_bias = check_scan_args(u, delta, A, B, C, D, z, delta_bias, backend)
    length = u.shape[2]
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if height * width != length:
        raise ValueError(f"height * width = {height} * {width} = {height * width} but u has L = {length}")
    layout = ScanLayout(height, width, bool(flip_h), bool(flip_v), bool(transpose))

    # A one-row (or one-column) grid is a 1D scan: on CUDA it takes the chunked 1D kernel.
    reverse = one_line_reverse(layout)
    if backend == "auto" and reverse is not None and _route_1d(u):
        from mamba2d.ops.scan1d_triton import selective_scan_1d_triton

        return selective_scan_1d_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if backend == "auto":
        backend = "triton" if u.is_cuda else "cpu" if cpu_available(u)[0] else "torch"
    if backend == "reference":
        from mamba2d.ops.reference import selective_scan_2d_reference

        return selective_scan_2d_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout)
    if backend == "torch":
        from mamba2d.ops.scan_torch import selective_scan_2d_torch

        return selective_scan_2d_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout)
    if backend == "cpu":
        ok, why = cpu_available(u)
        if not ok:
            raise ValueError(f"backend='cpu' cannot run here: {why}")
        from mamba2d.ops.scan_cpu import selective_scan_2d_cpu

        return selective_scan_2d_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout)
    from mamba2d.ops.scan_triton import selective_scan_2d_triton, triton_available

    ok, why = triton_available(u)
    if not ok:
        raise ValueError(f"backend='triton' cannot run here: {why}")
    return selective_scan_2d_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout)
