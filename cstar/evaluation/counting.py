"""Parameter and MAC counting.

The compute cost cstar counts is multiply-accumulates (MACs) of convolution and
linear layers for one image, as is conventional in pruning and low-rank
compression papers: bias additions, BatchNorm, activations and pooling are not
counted. A k x k conv producing an (C_out, H, W) map from C_in channels in
``groups`` groups costs C_out*H*W * (C_in/groups)*k*k MACs; a linear layer
costs out_features * in_features per row.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .._core.errors import CstarError
from .._core.renamed import old_name

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NO_COMPUTE = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout
)


@dataclass(frozen=True)
class LayerStats:
    """One row of :func:`layer_table`.

    ``params`` counts the module's own parameters; ``macs`` its conv/linear MACs
    for one image (0 for other kinds), summed over calls if it runs several
    times; ``in_shape``/``out_shape`` are from its first call, batch size 1
    (None if the module never ran).
    """

    name: str
    kind: str
    params: int
    macs: int
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, trainable or not (buffers excluded, shared parameters once)."""
    return sum(p.numel() for p in model.parameters())


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, _CONVS):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return out.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _shape(value: object) -> tuple[int, ...] | None:
    tensor = _first_tensor(value)
    return None if tensor is None else tuple(tensor.shape)


def _dummy_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise CstarError(
            f"input_shape must be (C, H, W) or (1, C, H, W) of positive ints, got {input_shape!r}"
        )
    reference = next(model.parameters(), None)
    if reference is None:
        reference = next(model.buffers(), None)
    if reference is None or not reference.is_floating_point():
        return torch.rand(shape)
    return torch.rand(shape, dtype=reference.dtype, device=reference.device)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode for the block; every submodule's own train/eval mode is restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerStats]:
    """Per-layer parameters, MACs and shapes, measured by one eval-mode forward of a batch-1 input.

    ``input_shape`` is (C, H, W) or (1, C, H, W); the input is uniform in [0, 1].
    Rows, in module order, are every module owning parameters plus every other
    leaf module that ran (identity and dropout excepted). The modes of all
    submodules are restored afterwards; no gradients are recorded.
    """
    x = _dummy_input(model, input_shape)
    seen: dict[str, dict] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            out = _first_tensor(output)
            if name not in seen:
                seen[name] = {"in": _shape(inputs), "out": _shape(output), "macs": 0}
            if out is not None:
                seen[name]["macs"] += _macs(module, out)

        return hook

    listed = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        is_leaf = next(module.children(), None) is None
        if own or (is_leaf and not isinstance(module, _NO_COMPUTE)):
            listed.append((name, module, own))
    handles = [module.register_forward_hook(hook_for(name)) for name, module, _ in listed]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except RuntimeError as exc:  # e.g. 3 channels into a model of 1: torch's line, not its traceback
        raise CstarError(f"the model cannot run on an input of shape {tuple(x.shape[1:])} "
                         f"({str(exc).strip().splitlines()[0]}): pass the (C, H, W) of the images it takes") from None
    finally:
        for handle in handles:
            handle.remove()

    rows = []
    for name, module, own in listed:
        stats = seen.get(name)
        if stats is None and not own:
            continue
        rows.append(
            LayerStats(
                name=name,
                kind=type(module).__name__,
                params=own,
                macs=stats["macs"] if stats else 0,
                in_shape=stats["in"] if stats else None,
                out_shape=stats["out"] if stats else None,
            )
        )
    return rows


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Total conv and linear MACs for one image of shape (C, H, W) (see the module docstring)."""
    return sum(row.macs for row in layer_table(model, input_shape))


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The old name of :func:`count_macs` (a :class:`FutureWarning`)."""
    old_name("count_flops", "count_macs")
    return count_macs(model, input_shape)


def format_table(rows: list[LayerStats]) -> str:
    """Aligned text table of ``rows`` (name, kind, params, MACs, out shape) with a total line."""
    header = ("name", "kind", "params", "MACs", "out shape")
    body = [
        (
            r.name or "(model)",
            r.kind,
            f"{r.params:,}",
            f"{r.macs:,}",
            "-" if r.out_shape is None else "x".join(map(str, r.out_shape)),
        )
        for r in rows
    ]
    total = ("total", "", f"{sum(r.params for r in rows):,}", f"{sum(r.macs for r in rows):,}", "")
    widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]
    numeric = (False, False, True, True, False)

    def fmt(line: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric)]
        return "  ".join(cells).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])
