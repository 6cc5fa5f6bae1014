"""Exported models read back, to be evaluated as they will run (:func:`load_exported`).

An ONNX file (``.onnx``) runs in onnxruntime, an OpenVINO IR (``.xml`` beside
its ``.bin``) in OpenVINO, both on the CPU. A file is data (docs/SECURITY.md):
each runtime reads a graph and its weights and runs no Python code from it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._core.errors import CstarError

SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}  # how a file says which runtime runs it


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported graph (``.onnx``, ``.xml``) rather than a cstar save or checkpoint."""
    return Path(path).suffix.lower() in SUFFIXES


class ExportedModel(nn.Module):
    """A forward-only module around an exported graph: images (N, C, H, W) in [0, 1] -> float32 logits (N, K)
    on the images' device, computed by the runtime on the CPU.

    No gradient flows through it: evaluate it clean, under the gradient-free
    Square attack, or under transfer attacks made on its float model
    (:func:`cstar.evaluate`'s ``source``). Attributes: ``path``; ``runtime``
    (name and version, e.g. ``"onnxruntime 1.20.1"``); ``input_shape`` (C, H, W),
    None where the graph leaves it free. Its one buffer, ``file_sha256``, is
    the file's SHA-256: what identifies it to a resumed evaluation.
    """

    def __init__(self, path: Path, run: Callable[[np.ndarray], np.ndarray], runtime: str,
                 input_shape: tuple[int, int, int] | None, digest: bytes):
        super().__init__()
        self.path, self.runtime, self.input_shape = path, runtime, input_shape
        self._run = run
        self.register_buffer("file_sha256", torch.tensor(list(digest), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        try:
            logits = self._run(images)
        except Exception as exc:  # noqa: BLE001  (each runtime raises its own types)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise RuntimeError(f"{self.runtime} cannot run {self.path.name} on images of shape {images.shape}: "
                               f"{reason}") from None
        return torch.from_numpy(np.array(logits, dtype=np.float32)).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.runtime}"


def load_exported(path: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """The exported graph at ``path`` as a module: an ``.onnx`` file in onnxruntime (all graph optimisations),
    an OpenVINO IR ``.xml`` in OpenVINO (float32 inference precision, so that only the quantised layers are
    INT8), with ``threads`` intra-op threads (default: torch's, ``torch.get_num_threads()``).

    Refused in one line: another suffix, a file the runtime cannot read, a graph
    that does not take one float batch (N, C, H, W), a runtime not installed.
    """
    path = Path(path)
    runtime = SUFFIXES.get(path.suffix.lower())
    if runtime is None or not path.is_file():
        what = "does not exist" if runtime is not None else "is not an exported graph"
        raise CstarError(f"{path} {what}: pass an ONNX file (.onnx) or an OpenVINO IR (.xml), e.g. one cstar export "
                         "wrote")
    threads = torch.get_num_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CstarError(f"threads={threads!r}: pass a whole number >= 1, or None for torch's")
    files = [path, path.with_suffix(".bin")] if runtime == "openvino" else [path]
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    run, version, shape = (_onnxruntime if runtime == "onnxruntime" else _openvino)(path, threads)
    return ExportedModel(path, run, version, shape, digest.digest())


def _unreadable(path: Path, runtime: str, exc: Exception) -> CstarError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return CstarError(f"{runtime} cannot read {path} ({reason}): pass a graph cstar export wrote, or re-export it")


def _image_input(path: Path, count: int, rank: int | None, is_float: bool) -> None:
    if count != 1 or rank != 4 or not is_float:
        raise CstarError(f"{path} takes {count} input(s), the first of rank {rank}, not one float batch of images "
                         "(N, C, H, W): pass an image classifier's graph")


def _static(dims) -> tuple[int, int, int] | None:
    """(C, H, W) of an input shape's last three dimensions, None when any is left free."""
    dims = list(dims)[1:]
    return tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None


def _tensors(graph) -> list:
    """Every tensor stored in an ONNX ``graph``: initialisers and node attributes, subgraphs included."""
    found = list(graph.initializer)
    found += [t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices)]
    for node in graph.node:
        for attribute in node.attribute:
            found += ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found += _tensors(sub)
    return found


def _check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose tensors point at data outside its own folder (a crafted file could read any
    file the user can into its weights); links are followed before the check."""
    try:
        import onnx
    except ImportError:
        raise CstarError("reading an ONNX model needs onnx: pip install 'cstar[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf's own exception types)
        raise _unreadable(path, "onnx", exc) from None
    folder = path.resolve().parent
    for tensor in _tensors(model.graph) + [t for f in model.functions for n in f.node for a in n.attribute
                                           for t in ([a.t] if a.HasField("t") else [])]:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise CstarError(f"{path}: tensor {tensor.name!r} points at data outside the model's folder "
                             f"({location!r}): the file is crafted; export the model again with cstar export")


def onnxruntime_session(source: str | bytes, threads: int):
    """An onnxruntime CPU session of an ONNX file or bytes: ``threads`` intra-op threads, every graph optimisation."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: a quantised graph's notes would be noise
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def openvino_compiled(source: str, threads: int):
    """An OpenVINO CPU model (ONNX file or IR ``.xml``) compiled with ``threads`` threads in float32 precision;
    returns (the read model, the compiled model)."""
    import openvino as ov
    core = ov.Core()
    graph = core.read_model(source)
    return graph, core.compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                    "INFERENCE_PRECISION_HINT": "f32"})


def _onnxruntime(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CstarError("running an ONNX model needs onnxruntime: pip install 'cstar[export]'") from None
    _check_external_data(path)
    try:
        session = onnxruntime_session(str(path), threads)
    except Exception as exc:  # noqa: BLE001  (onnxruntime's own exception types)
        raise _unreadable(path, "onnxruntime", exc) from None
    inputs = session.get_inputs()
    first = inputs[0] if inputs else None
    _image_input(path, len(inputs), first and len(first.shape), first is not None and first.type == "tensor(float)")
    name = first.name
    return (lambda x: session.run(None, {name: x})[0]), f"onnxruntime {ort.__version__}", _static(first.shape)


def _openvino(path: Path, threads: int):
    try:
        import openvino as ov
    except ImportError:
        raise CstarError("running an OpenVINO IR needs openvino: pip install 'cstar[openvino]'") from None
    try:
        graph, compiled = openvino_compiled(str(path), threads)
    except Exception as exc:  # noqa: BLE001  (OpenVINO's own exception types)
        raise _unreadable(path, "openvino", exc) from None
    inputs = graph.inputs
    shape = inputs[0].get_partial_shape() if inputs else None
    rank = shape.rank.get_length() if shape is not None and shape.rank.is_static else None
    _image_input(path, len(inputs), rank, bool(inputs) and inputs[0].get_element_type() == ov.Type.f32)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    dims = [d.get_length() if d.is_static else None for d in shape]
    return run, f"openvino {ov.get_version().split('-')[0]}", _static(dims)
