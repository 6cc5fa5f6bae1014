"""Channel dependency groups: which layers must shrink together when channels are removed.

:func:`cstar.prune.find_groups` traces a model with ``torch.fx`` (plus one eval-mode
forward of a random batch of 2 for the shapes) and follows every tensor's
channel dimension (dim 1) from the layer that produced it to every layer that
reads it. A *group* is one channel space: the convs/linears whose output
channels it is (``producers``), the BatchNorms it passes (``norms``) and the
convs/linears whose input channels it feeds (``consumers``). Channel ``c`` of
a group is removed by slicing row ``c`` of every producer and norm and input
column ``c`` of every consumer.

Followed through: BatchNorm1d/2d, activations, dropout, identity, pooling,
channel-preserving means, elementwise ``+ - * /`` of equal shapes (which
unites the two operands' groups: the residual stream of a ResNet is one group),
and a flatten of (C, H, W) into a linear layer (each channel is then H*W
consecutive input features of the consumer, recorded in ``expand``).

A group is *not prunable* (``prunable=False``, with ``reason``) when its
channels are the model input, reach the model output (the classifier's
logits), pass a concatenation, a grouped or depthwise conv, a per-channel
``Normalize``, a reshape other than such a flatten, or any operation not
listed above; the analysis never guesses.
"""

from __future__ import annotations

import builtins
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .._core.errors import CstarError
from ..evaluation.counting import _dummy_input, eval_mode
from ..lowrank._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ..models import Normalize
from ._group import ChannelGroup

#: Modules that keep channel c in channel c (exact classes).
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)
_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.clamp, F.dropout, F.dropout2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "contiguous", "clone", "float", "to"}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPES = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_SHAPE_QUERIES = {"size", "dim"}
_OPAQUE_LEAVES = (Normalize, Tucker2Conv2d, LowRankConv1x1, LowRankLinear)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps ``Normalize`` and cstar's factorised layers as single (opaque) calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _OPAQUE_LEAVES) or super().is_leaf_module(m, qualname)


class _Spaces:
    """Union-find over channel spaces; a root holds its size and why it may not be pruned ('' if it may)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.reason: list[str] = []

    def new(self, channels: int, reason: str = "") -> int:
        self.parent.append(len(self.parent))
        self.channels.append(channels)
        self.reason.append(reason)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            a, b = min(a, b), max(a, b)
            self.parent[b] = a
            self.reason[a] = self.reason[a] or self.reason[b]
        return a

    def block(self, i: int, reason: str) -> None:
        root = self.find(i)
        self.reason[root] = self.reason[root] or reason


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Symbolic trace of ``model`` with every node's output shape in ``meta`` (eval mode, modes restored)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError... for untraceable code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CstarError(
            f"cannot trace {type(model).__name__} with torch.fx ({first[:200]}): make its forward traceable "
            "(no Python control flow on tensor values), or pass graph='torch_pruning'"
        ) from None
    module = fx.GraphModule(model, graph)
    x = _dummy_input(model, input_shape)
    try:
        with eval_mode(model), torch.no_grad():
            ShapeProp(module).propagate(torch.cat([x, x]))
    except CstarError:
        raise
    except Exception as exc:
        raise CstarError(f"a forward pass of {type(model).__name__} on a (2, {', '.join(map(str, input_shape[-3:]))})"
                         f" input failed ({str(exc).strip()[:200]}): pass the model's input_shape=(C, H, W)") from None
    return module


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return {"call_module": f"module {target}", "call_method": f"method .{target}()"}.get(
        node.op, f"function {target}")


class _Walk:
    """One pass over the fx graph in execution order, building spaces and the layers' roles in them."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.gm = module
        self.spaces = _Spaces()
        self.state: dict[fx.Node, tuple[int, int]] = {}  # tensor node -> (space, features per channel)
        self.roles: list[tuple[int, str, str, int]] = []  # (space, "producer"|"norm"|"consumer", module, expand)
        self.module_in: dict[str, int] = {}
        self.module_out: dict[str, int] = {}
        self.bn_after: dict[str, str] = {}

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            inputs = [a for a in node.all_input_nodes if a in self.state]
            if node.op == "placeholder":
                self._fresh(node, "it is the model input")
            elif node.op == "get_attr":
                self._fresh(node, f"it is the model's tensor {node.target}")
                self._block_owner(node.target)
            elif node.op == "output":
                for a in inputs:
                    self.spaces.block(self.state[a][0], "it reaches the model output")
            elif node.op == "call_module":
                self._module(node, inputs)
            else:
                self._function(node, inputs)

    # -- helpers

    def _fresh(self, node: fx.Node, reason: str) -> None:
        shape = _shape(node)
        if shape is not None:
            self.state[node] = (self.spaces.new(shape[1] if len(shape) > 1 else 0, reason), 1)

    def _unknown(self, node: fx.Node, inputs: list[fx.Node], what: str | None = None) -> None:
        reason = f"it passes {what or _label(node)}, which channel pruning does not follow"
        for a in inputs:
            self.spaces.block(self.state[a][0], reason)
        self._fresh(node, reason)

    def _pass(self, node: fx.Node, source: fx.Node) -> None:
        self.state[node] = self.state[source]

    def _bind(self, table: dict[str, int], name: str, space: int) -> int:
        """The module's one space in ``table`` (a module called twice must see one channel set)."""
        if name in table:
            space = self.spaces.union(table[name], space)
        table[name] = space
        return space

    def _block_owner(self, target: str) -> None:
        owner = target.rpartition(".")[0]
        for table in (self.module_in, self.module_out):
            if owner in table:
                self.spaces.block(table[owner], f"tensor {target} is used outside its module")

    # -- modules

    def _module(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        name = node.target
        module = self.gm.get_submodule(name)
        kind, out_shape = type(module), _shape(node)
        x = inputs[0] if len(inputs) == 1 and len(node.args) == 1 and not node.kwargs else None
        in_shape = None if x is None else _shape(x)
        if x is None or out_shape is None or in_shape is None:
            self._unknown(node, inputs)
        elif kind is nn.Conv2d and module.groups == 1 and len(in_shape) == 4:
            self._layer(node, name, x, module.out_channels)
        elif kind is nn.Conv2d:
            self._unknown(node, inputs, f"grouped conv {name} (groups={module.groups})")
        elif kind is nn.Linear and len(in_shape) == 2:
            self._layer(node, name, x, module.out_features)
        elif kind in (nn.BatchNorm1d, nn.BatchNorm2d) and len(in_shape) >= 2:
            space, expand = self.state[x]
            space = self._bind(self.module_in, name, space)
            self.roles.append((space, "norm", name, expand))
            self.state[node] = (space, expand)
            if x.op == "call_module" and x.target in self.module_out and x.target not in self.bn_after:
                self.bn_after[x.target] = name
        elif kind in _PASS_MODULES and _keeps_channels(in_shape, out_shape):
            self._pass(node, x)
        elif kind is nn.Flatten:
            self._reshape(node, x, in_shape, out_shape)
        elif kind is Normalize:
            self.spaces.block(self.state[x][0], f"it is normalised per channel by {name}")
            self._pass(node, x)
        else:
            self._unknown(node, inputs)

    def _layer(self, node: fx.Node, name: str, x: fx.Node, out_channels: int) -> None:
        """A conv or linear: consumer of its input's space, producer of a new space."""
        space, expand = self.state[x]
        space = self._bind(self.module_in, name, space)
        self.roles.append((space, "consumer", name, expand))
        out = self._bind(self.module_out, name, self.spaces.new(out_channels))
        self.roles.append((out, "producer", name, 1))
        self.state[node] = (out, 1)

    # -- functions and methods

    def _function(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        target, out_shape = node.target, _shape(node)
        method = node.op == "call_method"
        if not inputs:  # shape arithmetic, or a tensor created inside forward
            self._fresh(node, f"it is created by {_label(node)}")
        elif out_shape is None:
            if (method and target in _SHAPE_QUERIES) or (
                    target is builtins.getattr and node.args[1] in ("shape", "dtype", "device")):
                return
            self._unknown(node, inputs)
        elif len(inputs) == 1 and ((method and target in _PASS_METHODS) or (not method and target in _PASS_FUNCTIONS)
                                   or _is_spatial_mean(node)):
            if _keeps_channels(_shape(inputs[0]), out_shape):
                self._pass(node, inputs[0])
            else:
                self._unknown(node, inputs)
        elif (method and target in _RESHAPE_METHODS) or (not method and target in _RESHAPES):
            if len(inputs) == 1 and node.args and node.args[0] is inputs[0]:
                self._reshape(node, inputs[0], _shape(inputs[0]), out_shape)
            else:
                self._unknown(node, inputs)
        elif (method and target in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE):
            self._elementwise(node, inputs, out_shape)
        else:
            self._unknown(node, inputs)

    def _reshape(self, node: fx.Node, x: fx.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        """Same shape: pass; (N, C, *S) -> (N, C * prod(S)): a flatten, each channel now prod(S) features."""
        space, expand = self.state[x]
        if in_shape == out_shape:
            self._pass(node, x)
        elif (len(in_shape) >= 3 and len(out_shape) == 2 and out_shape[0] == in_shape[0]
              and out_shape[1] == math.prod(in_shape[1:])):
            self.state[node] = (space, expand * math.prod(in_shape[2:]))
        else:
            self._unknown(node, [x], f"a reshape {in_shape[1:]} -> {out_shape[1:]} ({_label(node)})")

    def _elementwise(self, node: fx.Node, inputs: list[fx.Node], out_shape: tuple[int, ...]) -> None:
        """``a + b`` (and - * /) of equal shapes unites the groups; with a number it passes channels through."""
        tensors = [a for a in inputs if _shape(a) is not None]
        if len(tensors) == 1 and _shape(tensors[0]) == out_shape:
            self._pass(node, tensors[0])
            return
        if len(tensors) == 2 and _shape(tensors[0]) == _shape(tensors[1]) == out_shape:
            (a, ea), (b, eb) = self.state[tensors[0]], self.state[tensors[1]]
            if ea == eb:
                self.state[node] = (self.spaces.union(a, b), ea)
                return
        self._unknown(node, inputs, f"{_label(node)} of tensors of different shapes")


def _keeps_channels(in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None) -> bool:
    return (in_shape is not None and out_shape is not None and len(in_shape) == len(out_shape) >= 2
            and in_shape[:2] == out_shape[:2])


def _is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean(dims)`` / ``torch.mean(x, dims)`` over spatial dims only (channel dim 1 kept)."""
    if node.target not in ("mean", torch.mean):
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None or not all(isinstance(d, int) for d in (dims if isinstance(dims, (tuple, list)) else [dims])):
        return False
    x_shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if x_shape is None:
        return False
    rank = len(x_shape)
    return all(d % rank >= 2 for d in (dims if isinstance(dims, (tuple, list)) else [dims]))


def _collect(walk: _Walk) -> list[ChannelGroup]:
    """Groups (union-find roots holding at least one role) in order of first appearance."""
    spaces = walk.spaces
    by_root: dict[int, dict] = {}
    for space, role, name, expand in walk.roles:
        root = spaces.find(space)
        entry = by_root.setdefault(root, {"producer": [], "norm": [], "consumer": [], "expand": {}})
        if name not in entry[role]:
            entry[role].append(name)
        if expand != 1:
            entry["expand"][name] = expand
    groups = []
    for index, (root, entry) in enumerate(by_root.items()):
        reason = spaces.reason[root] or ("" if entry["producer"] else "no conv or linear layer produces it")
        producers = tuple(entry["producer"])
        groups.append(ChannelGroup(
            id=index, channels=spaces.channels[root], producers=producers, norms=tuple(entry["norm"]),
            consumers=tuple(entry["consumer"]), prunable=not reason, reason=reason, expand=entry["expand"],
            bn_after={p: walk.bn_after[p] for p in producers if walk.bn_after.get(p) in entry["norm"]},
        ))
    return groups


def fx_groups(model: nn.Module, shape: tuple[int, ...]) -> list[ChannelGroup]:
    """The channel groups of ``model`` by this module's torch.fx analysis (see :func:`find_groups`)."""
    walk = _Walk(_trace(model, shape))
    walk.run()
    return _collect(walk)
