"""The int8 fast model as a small file of quantisation parameters, rebuilt at load time.

NNCF's post-training quantisation (``export-fast``) turns the OpenVINO model of the SavedModel
(``fastmodel.derive_openvino``) into an int8 one by two kinds of change only:

* FakeQuantize nodes inserted on edges (activations: one range per tensor; weights: one
  range per output channel), which the CPU plugin turns into int8 kernels;
* new values for some constants (bias correction adjusts the biases after quantised
  convolutions).

An int8 IR would be a second 23 MB copy of the weights beside the SavedModel, and the shipped
artifact must stay under 100 MB. So the artifact stores only those changes (``int8.npz``, a
few hundred kB: where each FakeQuantize sits, its levels and ranges, and the changed
constants), and the server rebuilds the int8 model from the freshly converted SavedModel by
graph surgery with the OpenVINO Python API (``apply_quantisation``). Nodes are addressed by
their position in topological order, since ``convert_model`` names most nodes with a
process-wide counter; the converted graph is deterministic for an OpenVINO release (which
``metadata.json`` pins), and the file carries a signature of the graph (op types and shapes
in order) that the rebuild checks first. ``export-fast`` checks that the rebuilt model's
outputs equal NNCF's model's (parity) before it measures it.

Only OpenVINO and NumPy are imported here (the server imports this module; NNCF is needed
only by the exporter).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

PARAMS_FILE = "int8.npz"
FORMAT = 1
# Op types NNCF may add to the graph: the quantisers and the constants that feed them.
_ADDED = frozenset({"FakeQuantize", "Constant"})


class QuantisationMismatch(ValueError):
    """The quantisation parameters do not fit this model (another SavedModel or release)."""


def graph_signature(model: Any) -> str:
    """SHA-256 of the op types and output shapes in topological order (names are not stable:
    ``convert_model`` numbers most nodes with a process-wide counter)."""
    digest = hashlib.sha256()
    for op in model.get_ordered_ops():
        shapes = ",".join(str(op.get_output_partial_shape(i)) for i in range(op.get_output_size()))
        digest.update(f"{op.get_type_name()}[{shapes}];".encode())
    return digest.hexdigest()


def _same(a: Any, b: Any) -> bool:
    """Whether two OpenVINO outputs are the same port of the same node."""
    return bool(
        a.get_index() == b.get_index()
        and a.get_node().get_friendly_name() == b.get_node().get_friendly_name()
    )


def _constant_value(node: Any) -> np.ndarray:
    return np.array(node.get_data())


def extract_quantisation(original: Any, quantised: Any) -> dict[str, Any]:
    """What turns ``original`` into ``quantised`` (NNCF's model, weights not compressed).

    ``original`` must be the model NNCF was given (or a clone made in the same process: the
    node names connect the two). Returns ``{"graph", "fake_quantize", "constants"}``. Raises
    ``QuantisationMismatch`` when the quantised model differs in any other way (then it
    could not be rebuilt from the parameters alone).
    """
    ordered = list(original.get_ordered_ops())
    before = {op.get_friendly_name(): op for op in ordered}
    position = {op.get_friendly_name(): i for i, op in enumerate(ordered)}

    def port(output: Any) -> tuple[int, int]:
        name = output.get_node().get_friendly_name()
        if name not in position:
            raise QuantisationMismatch(f"{name} is not a node of the original model")
        return position[name], int(output.get_index())

    fake_quantize: list[dict[str, Any]] = []
    constants: dict[int, np.ndarray] = {}
    for op in quantised.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind == "FakeQuantize":
            source = op.input_value(0)
            if source.get_node().get_type_name() == "FakeQuantize":
                raise QuantisationMismatch(f"{name}: stacked FakeQuantize nodes")
            ranges = []
            for i in range(1, 5):
                node = op.input_value(i).get_node()
                if node.get_type_name() != "Constant":
                    raise QuantisationMismatch(f"{name}: range {i} is not a constant")
                ranges.append(_constant_value(node).astype(np.float32))
            fake_quantize.append(
                {
                    "source": port(source),
                    "targets": sorted(
                        (position[t.get_node().get_friendly_name()], int(t.get_index()))
                        for t in op.output(0).get_target_inputs()
                    ),
                    "levels": int(op.get_attributes()["levels"]),
                    "ranges": ranges,
                }
            )
            continue
        if name not in before:
            if kind in _ADDED:
                continue  # an FQ range (checked above) or NNCF's own constant
            raise QuantisationMismatch(f"the quantised model adds a {kind} node ({name})")
        if before[name].get_type_name() != kind:
            raise QuantisationMismatch(f"{name} changed type to {kind}")
        if kind == "Constant":
            old, new = _constant_value(before[name]), _constant_value(op)
            if old.shape != new.shape or old.dtype != new.dtype:
                raise QuantisationMismatch(f"constant {name} changed shape or type")
            if not np.array_equal(old, new):
                constants[position[name]] = new
    return {
        "graph": graph_signature(original),
        "fake_quantize": fake_quantize,
        "constants": constants,
    }


def save_quantisation(params: dict[str, Any], path: Path) -> None:
    """Write parameters as one ``.npz`` (a JSON index plus the arrays; no pickles)."""
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, Any] = {
        "format": FORMAT,
        "graph": params["graph"],
        "fake_quantize": [],
        "constants": [],
    }
    for i, fq in enumerate(params["fake_quantize"]):
        keys = [f"fq{i}_{part}" for part in ("il", "ih", "ol", "oh")]
        for key, value in zip(keys, fq["ranges"], strict=True):
            arrays[key] = np.asarray(value, dtype=np.float32)
        index["fake_quantize"].append(
            {
                "source": list(fq["source"]),
                "targets": [list(t) for t in fq["targets"]],
                "levels": fq["levels"],
                "ranges": keys,
            }
        )
    for i, (node, value) in enumerate(sorted(params["constants"].items())):
        arrays[f"c{i}"] = np.asarray(value)
        index["constants"].append({"node": int(node), "value": f"c{i}"})
    blob = np.frombuffer(json.dumps(index, sort_keys=True).encode(), dtype=np.uint8)
    with Path(path).open("wb") as fh:
        save: Any = np.savez_compressed  # its stubs type **kwds as its keyword options
        save(fh, index=blob, **arrays)


def load_quantisation(path: Path) -> dict[str, Any]:
    """Read what ``save_quantisation`` wrote."""
    with np.load(Path(path), allow_pickle=False) as data:
        index = json.loads(data["index"].tobytes().decode())
        if index.get("format") != FORMAT:
            raise QuantisationMismatch(f"{path}: unknown format {index.get('format')}")
        return {
            "graph": str(index["graph"]),
            "fake_quantize": [
                {
                    "source": (int(fq["source"][0]), int(fq["source"][1])),
                    "targets": [(int(t[0]), int(t[1])) for t in fq["targets"]],
                    "levels": int(fq["levels"]),
                    "ranges": [np.array(data[k]) for k in fq["ranges"]],
                }
                for fq in index["fake_quantize"]
            ],
            "constants": {int(c["node"]): np.array(data[c["value"]]) for c in index["constants"]},
        }


def apply_quantisation(model: Any, params: dict[str, Any]) -> Any:
    """Insert the FakeQuantize nodes and constant values of ``params`` into ``model`` (in place).

    ``model`` is a fresh ``fastmodel.derive_openvino`` model. Raises ``QuantisationMismatch``
    when its graph signature differs, a node or port does not exist, or a constant's shape
    differs.
    """
    from openvino import opset13 as ops

    if graph_signature(model) != params["graph"]:
        raise QuantisationMismatch("the converted model is not the graph the parameters describe")
    nodes = list(model.get_ordered_ops())

    def node(index: int) -> Any:
        if not 0 <= index < len(nodes):
            raise QuantisationMismatch(f"no node {index} in the converted model")
        return nodes[index]

    for index, value in params["constants"].items():
        old = node(index)
        if old.get_type_name() != "Constant":
            raise QuantisationMismatch(f"node {index} is a {old.get_type_name()}, not a constant")
        current = _constant_value(old)
        if current.shape != value.shape or current.dtype != value.dtype:
            raise QuantisationMismatch(f"constant {index} has another shape or type")
        new = ops.constant(np.ascontiguousarray(value))
        new.set_friendly_name(old.get_friendly_name())
        old.output(0).replace(new.output(0))
        nodes[index] = new
    for i, fq in enumerate(params["fake_quantize"]):
        source_index, port = fq["source"]
        source = node(source_index)
        if port >= source.get_output_size():
            raise QuantisationMismatch(f"node {source_index} has no output {port}")
        ranges = [ops.constant(np.asarray(r, dtype=np.float32)) for r in fq["ranges"]]
        quantiser = ops.fake_quantize(source.output(port), *ranges, int(fq["levels"]))
        quantiser.set_friendly_name(f"{source.get_friendly_name()}/int8_fq{i}")
        for target_index, slot in fq["targets"]:
            target = node(target_index)
            if slot >= target.get_input_size():
                raise QuantisationMismatch(f"node {target_index} has no input {slot}")
            if not _same(target.input_value(slot), source.output(port)):
                raise QuantisationMismatch(
                    f"node {target_index}:{slot} is not fed by {source_index}"
                )
            target.input(slot).replace_source_output(quantiser.output(0))
    model.validate_nodes_and_infer_types()
    return model


def derive_int8(artifact: Path, params_file: str = PARAMS_FILE) -> tuple[Any, bool]:
    """``fastmodel.derive_openvino`` plus the artifact's stored quantisation."""
    from model_training import fastmodel

    model, has_cam = fastmodel.derive_openvino(Path(artifact))
    return apply_quantisation(model, load_quantisation(Path(artifact) / params_file)), has_cam
