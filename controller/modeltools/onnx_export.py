"""Export dense ReLU stacks to ONNX and quantize them to int8 with ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def dense_to_onnx(layers: Sequence[tuple[np.ndarray, np.ndarray]], path: str | Path, in_dim: int,
                  relu_last: bool, input_name: str = "input", output_name: str = "features",
                  opset: int = 17) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    cur = input_name
    for i, (w, b) in enumerate(layers):
        wn, bn = f"w{i}", f"b{i}"
        inits += [numpy_helper.from_array(w.astype(np.float32), wn), numpy_helper.from_array(b.astype(np.float32), bn)]
        last = i == len(layers) - 1
        mm, add = f"mm{i}", (output_name if last and not relu_last else f"add{i}")
        nodes += [helper.make_node("MatMul", [cur, wn], [mm], name=f"MatMul_{i}"),
                  helper.make_node("Add", [mm, bn], [add], name=f"Add_{i}")]
        cur = add
        if not last or relu_last:
            out = output_name if last else f"relu{i}"
            nodes.append(helper.make_node("Relu", [add], [out], name=f"Relu_{i}"))
            cur = out
    out_dim = layers[-1][0].shape[1]
    graph = helper.make_graph(nodes, "edgefleet_backbone", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                                          ["batch", in_dim])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class _Calib:
    def __init__(self, name: str, data: np.ndarray) -> None:
        self._it = iter([{name: data[i:i + 1].astype(np.float32)} for i in range(len(data))])

    def get_next(self):  # onnxruntime.quantization.CalibrationDataReader protocol
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, input_name: str = "input",
                         per_channel: bool = True) -> None:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on real samples."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _Calib(input_name, calibration), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    calibrate_method=CalibrationMethod.MinMax)


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
