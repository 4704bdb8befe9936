"""2DVMamba: the VMamba (v2) backbone with 2D selective scans, and its 1D cross-scan twin.

Layout: images (batch, 3, H, W) in; inside the stages, tokens are channels-last
(batch, h, w, channels). ``forward_features`` returns (batch, H/32, W/32, C_last);
``forward_intermediates`` the feature maps (batch, C_i, H/s, W/s) at strides s = 4, 8, 16, 32.

SS2D (the token mixer): in_proj to d_inner = ssm_ratio * dim channels, a depthwise 3 x 3 conv
(no bias) and SiLU, then K = 4 selective scans, each with its own x_proj, dt_proj, A and D, summed;
LayerNorm and out_proj (VMamba's "no z" form). ``scan="2d"``: each direction is a 2D scan, from
the top-left and from the bottom-right corner, each horizontal-first and vertical-first (the
operator's ``flip_h``/``flip_v``/``transpose``, no flipped copies). ``scan="1d"``: VMamba's cross
scan, four 1D scans over the row-major and column-major orders, forwards and backwards
(``selective_scan_1d``). The two variants have the same parameters and differ only in the scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mamba2d.nn.mamba2d import mamba_dt_bias
from mamba2d.ops import selective_scan_1d, selective_scan_2d

__all__ = ["BUILDERS", "SS2D", "VMamba2D", "VSSBlock", "vmamba1d_base", "vmamba1d_small", "vmamba1d_tiny",
           "vmamba2d_base", "vmamba2d_small", "vmamba2d_tiny"]

# (flip_h, flip_v, transpose) of the four 2D directions: top-left horizontal-first, top-left
# vertical-first, bottom-right horizontal-first, bottom-right vertical-first.
_DIRECTIONS_2D = ((False, False, False), (False, False, True), (True, True, False), (True, True, True))


class SS2D(nn.Module):
    """The 2D-selective-scan mixer of a VSS block. Input and output: (batch, h, w, dim)."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, dt_rank: int | None = None,
                 scan: Literal["2d", "1d"] = "2d", backend: str = "auto") -> None:
        super().__init__()
        if scan not in ("2d", "1d"):
            raise ValueError(f"scan must be '2d' or '1d', got {scan!r}")
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state, self.scan, self.backend, self.k = d_state, scan, backend, 4
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=False)
        # Per-direction projections, stacked: (K, out, in).
        self.x_proj = nn.Parameter(torch.empty(self.k, self.dt_rank + 2 * d_state, d_inner))
        self.dt_proj = nn.Parameter(torch.empty(self.k, d_inner, self.dt_rank))
        self.dt_bias = nn.Parameter(torch.stack([mamba_dt_bias(d_inner) for _ in range(self.k)]))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(self.k, d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.k, d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        nn.init.uniform_(self.x_proj, -(d_inner**-0.5), d_inner**-0.5)
        nn.init.uniform_(self.dt_proj, -(self.dt_rank**-0.5), self.dt_rank**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, h, w, _ = x.shape
        L = h * w
        xs = self.in_proj(x).permute(0, 3, 1, 2)  # (batch, d_inner, h, w)
        xs = F.silu(self.conv(xs)).reshape(batch, self.d_inner, L)
        A = -torch.exp(self.A_log.float())
        y = None
        for k in range(self.k):
            u, order = self._order(xs, k, h, w)  # (batch, d_inner, L) in the direction's token order
            proj = torch.einsum("bdl,od->bol", u, self.x_proj[k])
            dt, B, C = proj.split([self.dt_rank, self.d_state, self.d_state], dim=1)
            delta = torch.einsum("brl,dr->bdl", dt, self.dt_proj[k])
            if self.scan == "2d":
                flip_h, flip_v, transpose = _DIRECTIONS_2D[k]
                yk = selective_scan_2d(u, delta, A[k], B, C, self.D[k].float(), None, self.dt_bias[k].float(),
                                       True, height=h, width=w, flip_h=flip_h, flip_v=flip_v,
                                       transpose=transpose, backend=self.backend)
            else:
                yk = selective_scan_1d(u, delta, A[k], B, C, self.D[k].float(), None, self.dt_bias[k].float(),
                                       True, reverse=k >= 2, backend=self.backend)
                yk = self._unorder(yk, order, h, w)
            y = yk if y is None else y + yk
        y = self.out_norm(y.transpose(1, 2).reshape(batch, h, w, self.d_inner).to(x.dtype))
        return self.out_proj(y)

    def _order(self, xs: torch.Tensor, k: int, h: int, w: int) -> tuple[torch.Tensor, str]:
        """The tokens in direction k's order: the 2D scans read the row-major grid as it is; the
        1D scans read row-major (k = 0, 2) or column-major (k = 1, 3) sequences."""
        if self.scan == "2d" or k in (0, 2):
            return xs, "rows"
        b, d, _ = xs.shape
        return xs.reshape(b, d, h, w).transpose(2, 3).reshape(b, d, h * w), "cols"

    @staticmethod
    def _unorder(y: torch.Tensor, order: str, h: int, w: int) -> torch.Tensor:
        if order == "rows":
            return y
        b, d, _ = y.shape
        return y.reshape(b, d, w, h).transpose(2, 3).reshape(b, d, h * w)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))); (batch, h, w, dim) in and out."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, d_state: int = 1,
                 ssm_ratio: float = 1.0, scan: Literal["2d", "1d"] = "2d", backend: str = "auto") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, scan=scan, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth per sample, rescaled so the expectation is unchanged.
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.mixer(self.norm(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class _ChannelsLastNorm(nn.Module):
    """LayerNorm over channels of an NCHW map, returning NCHW."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class VMamba2D(nn.Module):
    """The backbone: stem (two stride-2 3 x 3 convs with LayerNorm, patch size 4), four stages of
    VSS blocks with stride-2 3 x 3 conv downsampling between them, LayerNorm, average pooling and
    a linear head (``num_classes`` 0: no head). Input sides must be multiples of 32.

    ``dims``: channels of stage 1 (doubled at each later stage) or all four; ``depths``: blocks
    per stage; ``drop_path_rate``: stochastic depth rising linearly to this over the blocks.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), dims: int | Sequence[int] = 96, d_state: int = 1,
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
                 num_classes: int = 1000, in_chans: int = 3, scan: Literal["2d", "1d"] = "2d",
                 backend: str = "auto") -> None:
        super().__init__()
        dims = [dims * 2**i for i in range(4)] if isinstance(dims, int) else list(dims)
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"need four stages, got depths {list(depths)} and dims {dims}")
        self.dims, self.scan, self.num_classes = dims, scan, num_classes
        self.num_features = dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1), _ChannelsLastNorm(dims[0] // 2),
            nn.GELU(), nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1), _ChannelsLastNorm(dims[0]))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*[
                VSSBlock(dims[i], rates[start + j], mlp_ratio, d_state, ssm_ratio, scan, backend)
                for j in range(depth)]))
            start += depth
            if i < 3:
                self.downsamples.append(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1),
                                                      _ChannelsLastNorm(dims[i + 1])))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each VSS block's activations in the backward pass instead of keeping them
        (``torch.utils.checkpoint``): less memory for one more forward per block. Gradients are
        unchanged (dropout and drop path see the same random numbers both times). timm's
        ``--grad-checkpointing`` calls this."""
        self.grad_checkpointing = bool(enable)

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.stages[i](x)
        for block in self.stages[i]:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"images must be (batch, C, H, W) with H and W multiples of 32, "
                             f"got {tuple(images.shape)}")

    @property
    def feature_info(self) -> list[dict]:
        """timm's per-stage metadata: channels, stride and module name of each feature map."""
        return [{"num_chs": self.dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"}
                for i in range(len(self.stages))]

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """Stage indices as timm reads them: None all, an int the last n, a sequence as given
        (negative counts from the end)."""
        n = len(self.stages)
        if indices is None:
            indices = n
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices} asks for the last {indices} of {n} stages")
            return list(range(n - indices, n))
        taken = [i + n if i < 0 else i for i in indices]
        if any(not 0 <= i < n for i in taken):
            raise ValueError(f"stage indices {list(indices)} out of range for {n} stages")
        return taken

    def forward_intermediates(
        self, images: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
        stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs at strides 4, 8, 16, 32, in timm's convention.

        ``indices``: stages to return (None: all four; int n: the last n). Each map is
        (batch, dims[i], H / 2**(i+2), W / 2**(i+2)) for ``output_fmt="NCHW"``, or channels-last
        for ``"NHWC"``. ``norm`` applies the final LayerNorm to the last stage's map.
        Returns the maps if ``intermediates_only``, else (final features as in
        :meth:`forward_features`, maps); ``stop_early`` skips stages after the last one asked for.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check(images)
        take = self._take_indices(indices)
        last = max(take) if (stop_early or intermediates_only) else len(self.stages) - 1
        x = self.stem(images).permute(0, 2, 3, 1)  # channels-last inside the stages
        maps = []
        for i in range(last + 1):
            if i > 0:
                x = self.downsamples[i - 1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = self._run_stage(i, x)
            if i in take:
                out = self.norm(x) if norm and i == len(self.stages) - 1 else x
                maps.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the head); timm's feature wrapper
        calls this for ``features_only``. Returns the absolute indices."""
        take = self._take_indices(indices)
        last = max(take)
        self.stages = self.stages[: last + 1]
        self.downsamples = self.downsamples[:last]
        if last < 3 or prune_norm:
            self.norm = nn.Identity()
        if last < 3:
            self.num_features = self.dims[last]
        if prune_head or last < 3:
            self.reset_classifier(0)
        return take

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, H/32, W/32, dims[-1]) after the final LayerNorm."""
        return self.forward_intermediates(images, indices=1, output_fmt="NHWC")[0]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(1, 2))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh linear head for ``num_classes`` (0: none); pooling is always the mean."""
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"only average pooling is supported, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """SSM parameters kept out of weight decay (A, D and the dt bias), as Mamba does; norms and
        biases are excluded by the optimizer factories already."""
        return {name for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")}


def _build(scan: Literal["2d", "1d"], config_depths: Sequence[int], config_ssm_ratio: float,
           config_drop_path: float, config_dims: int = 96, **kwargs) -> VMamba2D:
    """A config's defaults, overridden by any :class:`VMamba2D` argument in ``kwargs``."""
    config = {"depths": config_depths, "dims": config_dims, "d_state": 1, "ssm_ratio": config_ssm_ratio,
              "drop_path_rate": config_drop_path}
    return VMamba2D(scan=scan, **{**config, **kwargs})


def vmamba2d_tiny(**kwargs) -> VMamba2D:
    """2DVMamba-T: dims 96, depths [2, 2, 8, 2], d_state 1, ssm_ratio 1.0, drop path 0.2."""
    return _build("2d", (2, 2, 8, 2), 1.0, 0.2, **kwargs)


def vmamba2d_small(**kwargs) -> VMamba2D:
    """2DVMamba-S: dims 96, depths [2, 2, 15, 2], d_state 1, ssm_ratio 2.0, drop path 0.3."""
    return _build("2d", (2, 2, 15, 2), 2.0, 0.3, **kwargs)


def vmamba2d_base(**kwargs) -> VMamba2D:
    """2DVMamba-B: dims 128, depths [2, 2, 15, 2], d_state 1, ssm_ratio 2.0, drop path 0.6 (VMamba-B's
    configuration with the 2D scan)."""
    return _build("2d", (2, 2, 15, 2), 2.0, 0.6, 128, **kwargs)


def vmamba1d_tiny(**kwargs) -> VMamba2D:
    """The 1D cross-scan twin of :func:`vmamba2d_tiny` (VMamba-T's scan, same parameters)."""
    return _build("1d", (2, 2, 8, 2), 1.0, 0.2, **kwargs)


def vmamba1d_small(**kwargs) -> VMamba2D:
    """The 1D cross-scan twin of :func:`vmamba2d_small`."""
    return _build("1d", (2, 2, 15, 2), 2.0, 0.3, **kwargs)


def vmamba1d_base(**kwargs) -> VMamba2D:
    """The 1D cross-scan twin of :func:`vmamba2d_base` (VMamba-B's scan)."""
    return _build("1d", (2, 2, 15, 2), 2.0, 0.6, 128, **kwargs)


# Every builder by name: timm registers these, and the tests build each one.
BUILDERS = {f.__name__: f for f in (vmamba2d_tiny, vmamba2d_small, vmamba2d_base,
                                    vmamba1d_tiny, vmamba1d_small, vmamba1d_base)}
