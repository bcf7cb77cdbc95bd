"""Regenerate the committed LiteRT test models (run by hand; needs tensorflow-cpu, never a dependency).

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu scikit-learn
    /tmp/tf/bin/python tests/models/make_tflite.py

Writes digits_float.tflite and digits_int8.tflite (full-integer int8, int8 input/output,
calibrated on real samples) plus digits_tflite_meta.json with their test accuracy, from
scikit-learn's bundled digits: input [1, 64] float in 0..16, output 10 class scores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:1437], idx[1437:]
    model = tf.keras.Sequential([
        tf.keras.Input(shape=(64,), batch_size=1, name="input"),
        tf.keras.layers.Rescaling(1 / 16),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(32, activation="relu"),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[tr], y[tr], epochs=40, batch_size=32, verbose=0)
    keras_acc = float(model.evaluate(x[te], y[te], verbose=0)[1])

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (HERE / "digits_float.tflite").write_bytes(conv.convert())

    def rep():
        for i in tr[:200]:
            yield [x[i:i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (HERE / "digits_int8.tflite").write_bytes(conv.convert())
    np.save(HERE / "digits_test_x.npy", x[te][:100])
    np.save(HERE / "digits_test_y.npy", y[te][:100])
    (HERE / "digits_tflite_meta.json").write_text(json.dumps(
        {"keras_test_accuracy": round(keras_acc, 4), "test_rows": "digits_test_x.npy / digits_test_y.npy (100)",
         "tensorflow": tf.__version__}, indent=2))
    print("keras accuracy", keras_acc)


if __name__ == "__main__":
    main()
