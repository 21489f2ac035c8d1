"""Convert a TensorFlow SSD graph to ONNX, once, with the project's own code.

The input is what OpenCV's ``readNetFromTensorflow(pb, pbtxt)`` took: a frozen graph
(weights) and OpenCV's text graph of it (the network OpenCV builds: the backbone, the box
predictors, and its own ``PriorBox`` and ``DetectionOutput`` layers in place of
TensorFlow's post-processing). Each op of the text graph becomes the ONNX op that
computes the same, with the weights of the frozen graph, the way OpenCV's importer
reads them (NHWC becomes NCHW; a ``BiasAdd`` joins its convolution; box encodings
marked ``loc_pred_transposed`` have their ``(y, x, h, w)`` channels put in ``(x, y, w, h)``
order). ``PriorBox`` and ``DetectionOutput`` stay outside the ONNX graph: their settings
go into the model's metadata for :mod:`stream_rt.operators.ssd_output`, and the model
outputs the shape of each feature map the anchors are laid on.

The ONNX model takes what ``cv2.dnn.blobFromImage(rgb)`` gave OpenCV: ``1 x 3 x H x W``
float32 RGB in 0..255. It outputs ``locations`` (``1 x 4N``), ``scores`` (``1 x N·classes``)
and, for each ``PriorBox``, its feature map's shape.

:func:`cached_model` keeps the converted model under ``$XDG_CACHE_HOME/stream_rt/``
(``~/.cache/stream_rt/``), named by the hash of both input files and of this converter's
version, written atomically; ``onnx`` is needed only to convert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_rt.operators.ssd_output import DetectionOutput, PriorBox
from stream_rt.operators.tf_graph import GraphFileError, TfNode, TfTensor, read_graph_def, read_text_graph

log = logging.getLogger("stream_rt.objects")

VERSION = 1
"""Bumped whenever the conversion changes what it writes, so old cached models are not used."""
METADATA_KEY = "stream_rt.ssd"
_OPSET = 13
_IR_VERSION = 7  # ONNX Runtime 1.17 and later read it
_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1, -2: 3, -3: 2}


@dataclass(frozen=True, slots=True)
class Head:
    """What the converted model leaves to :mod:`stream_rt.operators.ssd_output`, kept in
    its metadata: the names of its input and outputs, and the settings of the layers."""

    input: str
    locations: str
    scores: str
    priors: tuple[tuple[PriorBox, str], ...]  # each feature map's anchors, the output giving its shape
    detection: DetectionOutput

    def to_json(self) -> str:
        priors = [asdict(prior) | {"shape": shape} for prior, shape in self.priors]
        return json.dumps({"version": VERSION, "input": self.input, "locations": self.locations,
                           "scores": self.scores, "priors": priors, "detection": asdict(self.detection)})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Head:
        """Raises ValueError, KeyError or TypeError for metadata not written by :meth:`to_json`."""
        meta = json.loads(text)
        if meta.get("version") != VERSION:
            raise ValueError(f"converter version {meta.get('version')}, not {VERSION}")
        priors = tuple(
            (
                PriorBox(tuple(p["widths"]), tuple(p["heights"]), tuple(p["variance"]), p["offset"], p["clip"]),
                p["shape"],
            )
            for p in meta["priors"]
        )
        return cls(meta["input"], meta["locations"], meta["scores"], priors, DetectionOutput(**meta["detection"]))


class ConversionError(ValueError):
    """The graph cannot be converted: a file is not what it should be, or uses an op the converter lacks."""


class ConverterMissing(ConversionError):
    """The ``onnx`` package, needed to convert, is not installed."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stream_rt"


def cached_model(graph: Path, text: Path, *, name: str = "ssd") -> Path | bytes:
    """The path of the converted model, converting it first if it is not cached yet; the
    model itself when the cache cannot be written (it is then converted at every start)."""
    try:
        graph_bytes, text_bytes = graph.read_bytes(), text.read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read {exc.filename}: {exc.strerror}") from None
    digest = hashlib.sha256(b"%d\0" % VERSION)
    digest.update(hashlib.sha256(graph_bytes).digest())
    digest.update(hashlib.sha256(text_bytes).digest())
    path = cache_dir() / f"{name}-{digest.hexdigest()[:20]}.onnx"
    if path.is_file():
        return path
    log.info("converting %s to ONNX for ONNX Runtime (once, a few seconds): %s", graph.name, path)
    model = convert(graph_bytes, text_bytes.decode("utf-8", "replace"))
    try:
        write_atomically(path, model)
    except OSError as exc:
        log.warning("cannot cache the converted model in %s (%s): converting at every start", path.parent, exc)
        return model
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # readable like any cached file, not mkstemp's 0600
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(graph_bytes: bytes, text: str) -> bytes:
    """The serialized ONNX model of the text graph ``text`` with the weights of the frozen graph."""
    try:
        import onnx
    except ImportError:
        raise ConverterMissing("converting the graph to ONNX needs 'onnx': pip install 'stream-rt[detect]'") from None
    try:
        nodes = read_text_graph(text)
    except GraphFileError as exc:
        raise ConversionError(f"the text graph is unreadable: {exc}") from None
    try:
        weights = {n.name: n.attrs["value"] for n in read_graph_def(graph_bytes) if n.op == "Const"}
    except GraphFileError as exc:
        raise ConversionError(f"the frozen graph is unreadable: {exc}") from None
    try:
        model = _Builder(nodes, weights).build()
        onnx.checker.check_model(model)
    except GraphFileError as exc:
        raise ConversionError(f"a constant of the frozen graph is unreadable: {exc}") from None
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the converted model is not valid ONNX: {str(exc).splitlines()[0]}") from None
    data: bytes = model.SerializeToString()
    return data


class _Builder:
    def __init__(self, nodes: list[TfNode], weights: dict[str, Any]) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.aliases = {n.name: n.inputs[0] for n in nodes if n.op == "Identity"}  # as OpenCV: Identity is removed
        self.nodes = [n for n in nodes if n.op != "Identity"]
        self.by_name = {n.name: n for n in self.nodes}
        self.weights = weights | {n.name: n.attrs["value"] for n in self.nodes if n.op == "Const"}
        self.onnx_nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.planar: set[str] = set()  # tensors no longer NCHW (flattened)
        self.fused: dict[str, str] = {}  # a BiasAdd joined to its convolution -> that convolution
        self.biases = {self._source(n.inputs[0]): n for n in self.nodes if n.op == "BiasAdd"}
        self.priors: dict[str, PriorBox] = {}  # PriorBox nodes
        self.prior_order: list[str] = []  # as concatenated for DetectionOutput
        self.outputs: list[Any] = []
        self.head: Head | None = None

    # -- helpers

    def _source(self, name: str) -> str:
        name = name.split(":")[0].lstrip("^")
        while name in self.aliases:
            name = self.aliases[name].split(":")[0]
        return self.fused.get(name, name)

    def _const(self, name: str) -> npt.NDArray[Any] | None:
        value = self.weights.get(self._source(name))
        return value.array() if isinstance(value, TfTensor) else None

    def _init(self, name: str, array: npt.NDArray[Any]) -> str:
        self.initializers[name] = self.numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def _add(self, op: str, inputs: list[str], output: str, **attrs: Any) -> None:
        self.onnx_nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))

    def _split(self, node: TfNode) -> tuple[list[str], list[npt.NDArray[Any]]]:
        """The node's tensor inputs and its constant inputs."""
        tensors, consts = [], []
        for name in node.inputs:
            if name.startswith("^"):
                continue
            value = self._const(name)
            if value is None:
                tensors.append(self._source(name))
            else:
                consts.append(value)
        return tensors, consts

    # -- the graph

    def build(self) -> Any:
        helper = self.helper
        inputs = [n for n in self.nodes if n.op == "Placeholder"]
        if len(inputs) != 1:
            raise ConversionError(f"expected one input placeholder, found {len(inputs)}")
        self.input = inputs[0].name
        for node in self.nodes:
            handler = getattr(self, f"_op_{node.op}", None)
            if handler is None:
                raise ConversionError(f"node '{node.name}': op {node.op} is not supported by the converter")
            handler(node)
        if self.head is None:
            raise ConversionError("the text graph has no DetectionOutput node")
        graph = helper.make_graph(
            self.onnx_nodes,
            "ssd",
            [helper.make_tensor_value_info(self.input, 1, [1, 3, "height", "width"])],
            self.outputs,
            list(self.initializers.values()),
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="stream_rt")
        model.ir_version = _IR_VERSION
        helper.set_model_props(model, {METADATA_KEY: self.head.to_json()})
        return model

    def _op_Placeholder(self, node: TfNode) -> None:
        pass

    def _op_Const(self, node: TfNode) -> None:
        pass

    def _elementwise(self, node: TfNode, op: str) -> None:
        tensors, consts = self._split(node)
        names = list(tensors)
        for i, value in enumerate(consts):
            value = value.astype(np.float32)
            if value.ndim == 1 and value.size > 1:  # per channel: NHWC's last axis is NCHW's second
                value = value.reshape(1, -1, 1, 1)
            names.append(self._init(f"{node.name}/const{i}", value))
        if len(names) != 2:
            raise ConversionError(f"node '{node.name}': {node.op} of {len(names)} operands")
        if consts and node.inputs and self._const(node.inputs[0]) is not None:
            names.reverse()  # the constant came first
        self._add(op, names, node.name)

    def _op_Mul(self, node: TfNode) -> None:
        self._elementwise(node, "Mul")

    def _op_Sub(self, node: TfNode) -> None:
        self._elementwise(node, "Sub")

    def _op_Add(self, node: TfNode) -> None:
        self._elementwise(node, "Add")

    _op_AddV2 = _op_Add

    def _op_BiasAdd(self, node: TfNode) -> None:
        if node.name not in self.fused:
            self._elementwise(node, "Add")

    def _op_Relu6(self, node: TfNode) -> None:
        if "relu6/max" not in self.initializers:
            self._init("relu6/min", np.zeros((), np.float32))
            self._init("relu6/max", np.full((), 6, np.float32))
        self._add("Clip", [self._source(node.inputs[0]), "relu6/min", "relu6/max"], node.name)

    def _op_Relu(self, node: TfNode) -> None:
        self._add("Relu", [self._source(node.inputs[0])], node.name)

    def _op_Sigmoid(self, node: TfNode) -> None:
        source = self._source(node.inputs[0])
        if source in self.planar:
            self.planar.add(node.name)
        self._add("Sigmoid", [source], node.name)

    def _op_FusedBatchNorm(self, node: TfNode) -> None:
        tensors, consts = self._split(node)
        if len(tensors) != 1 or len(consts) != 4:
            raise ConversionError(f"node '{node.name}': batch norm without constant parameters")
        names = [self._init(f"{node.name}/{part}", c.astype(np.float32))
                 for part, c in zip(("scale", "bias", "mean", "var"), consts, strict=True)]  # fmt: skip
        self._add("BatchNormalization", [tensors[0], *names], node.name, epsilon=float(node.attrs.get("epsilon", 1e-4)))

    _op_FusedBatchNormV3 = _op_FusedBatchNorm

    def _conv(self, node: TfNode, depthwise: bool) -> None:
        tensors, consts = self._split(node)
        if len(tensors) != 1 or len(consts) != 1 or consts[0].ndim != 4:
            missing = [n for n in node.inputs[1:] if self._const(n) is None]
            what = f"weights {missing[0]!r} missing from the frozen graph" if missing else "weights not 4-D"
            raise ConversionError(f"node '{node.name}': {what}")
        kernel = consts[0].astype(np.float32)  # TF: height, width, in, out (depthwise: in, multiplier)
        if node.attrs.get("data_format", "NHWC") != "NHWC":
            raise ConversionError(f"node '{node.name}': only NHWC convolutions are supported")
        height, width, channels, per = kernel.shape
        if depthwise:
            weights = kernel.transpose(2, 3, 0, 1).reshape(channels * per, 1, height, width)
            group = channels
        else:
            weights, group = kernel.transpose(3, 2, 0, 1), 1
        bias_node = self.biases.get(node.name)
        bias = self._const(bias_node.inputs[1]) if bias_node is not None and len(bias_node.inputs) == 2 else None
        if node.attrs.get("loc_pred_transposed", False):  # (y, x, h, w) -> (x, y, w, h), as OpenCV does
            if depthwise or weights.shape[0] % 4:
                raise ConversionError(f"node '{node.name}': loc_pred_transposed on {weights.shape[0]} outputs")
            swap = np.arange(weights.shape[0]).reshape(-1, 2)[:, ::-1].ravel()
            weights = weights[swap]
            bias = bias[swap] if bias is not None else None
        strides = node.attrs.get("strides", [1, 1, 1, 1])
        dilations = node.attrs.get("dilations", [1, 1, 1, 1])
        padding = node.attrs.get("padding", "VALID")
        if padding not in ("SAME", "VALID"):
            raise ConversionError(f"node '{node.name}': padding {padding}")
        inputs = [tensors[0], self._init(f"{node.name}/weights", weights)]
        output = node.name
        if bias is not None and bias_node is not None:
            inputs.append(self._init(f"{node.name}/bias", bias.astype(np.float32)))
            self.fused[bias_node.name] = node.name
        self._add(
            "Conv", inputs, output, group=group, kernel_shape=[height, width], strides=[strides[1], strides[2]],
            dilations=[dilations[1], dilations[2]], auto_pad="SAME_UPPER" if padding == "SAME" else "VALID",
        )  # fmt: skip

    def _op_Conv2D(self, node: TfNode) -> None:
        self._conv(node, depthwise=False)

    def _op_DepthwiseConv2dNative(self, node: TfNode) -> None:
        self._conv(node, depthwise=True)

    def _op_Flatten(self, node: TfNode) -> None:
        source = self._source(node.inputs[0])
        if source not in self.planar:  # flattened in TensorFlow's order: rows, columns, channels
            self._add("Transpose", [source], f"{node.name}/nhwc", perm=[0, 2, 3, 1])
            source = f"{node.name}/nhwc"
        self._add("Flatten", [source], node.name, axis=1)
        self.planar.add(node.name)

    def _op_ConcatV2(self, node: TfNode) -> None:
        *parts, axis_name = node.inputs
        axis_value = self._const(axis_name)
        if axis_value is None:
            raise ConversionError(f"node '{node.name}': concatenation axis is not a constant")
        sources = [self._source(p) for p in parts]
        if all(s in self.priors for s in sources):  # the anchors: laid out by ssd_output, in this order
            self.prior_order = sources
            self.priors[node.name] = self.priors[sources[0]]
            return
        axis = int(axis_value.ravel()[0])
        if not all(s in self.planar for s in sources):
            axis = _NHWC_TO_NCHW_AXIS[axis]
        else:
            self.planar.add(node.name)
        self._add("Concat", sources, node.name, axis=axis)

    def _op_PriorBox(self, node: TfNode) -> None:
        attrs = {k: (v.array().tolist() if isinstance(v, TfTensor) else v) for k, v in node.attrs.items()}
        try:
            settings = PriorBox.from_attrs(attrs)
        except ValueError as exc:
            raise ConversionError(f"node '{node.name}': {exc}") from None
        if self._source(node.inputs[1]) != self.input:
            raise ConversionError(f"node '{node.name}': anchors over a tensor other than the input image")
        self.priors[node.name] = settings
        self._add("Shape", [self._source(node.inputs[0])], f"{node.name}/shape")
        self.outputs.append(self.helper.make_tensor_value_info(f"{node.name}/shape", 7, [4]))

    def _op_DetectionOutput(self, node: TfNode) -> None:
        try:
            settings = DetectionOutput.from_attrs(node.attrs)
        except (KeyError, ValueError) as exc:
            raise ConversionError(f"node '{node.name}': {exc}") from None
        locations, scores, priors = (self._source(i) for i in node.inputs[:3])
        if priors not in self.priors or not self.prior_order:
            raise ConversionError(f"node '{node.name}': its third input is not the concatenated PriorBox layers")
        for name in (locations, scores):
            self.outputs.append(self.helper.make_tensor_value_info(name, 1, [1, None]))
        layers = tuple((self.priors[p], f"{p}/shape") for p in self.prior_order)
        self.head = Head(self.input, locations, scores, layers, settings)
