"""End to end on data not shaped like Fashion-MNIST: coloured shapes, 32 x 32 x 3, 10 classes, in three
forms (a PNG image folder, a channel-last and a channel-first .npz) that prepare to one content, then
through every stage's command line at smoke size: prepare, jitter (the shifted copies), a CNN
teacher, the cache on the jittered set, a depthwise-separable CNN student, its raw-pixel (uint8, per-channel
normalisation in the graph) fp32 and int8 export, and the bench."""
import json

import numpy as np
import pytest

from pipeline.formats.prepared import open_prepared
from stages.prepare import PrepareConfig, prepare_dataset
from tests.conftest import run_cli
from tests.images import CLASSES, assert_same_content, coloured_shapes, folder_order, write_folder


@pytest.mark.slow
def test_colour_image_folder_through_every_stage(tmp_path):
    x, y = coloured_shapes(700, seed=0)
    xt, yt = coloured_shapes(300, seed=1)
    write_folder(tmp_path / "png" / "train", x, y)
    write_folder(tmp_path / "png" / "test", xt, yt)
    p, pj, t, c, s = (tmp_path / n for n in ("p.h5", "pj.h5", "t/ensemble.onnx", "c.h5", "s.ckpt"))

    run_cli("prepare", "--image-folder", tmp_path / "png", "--out", p, "--val-rows", "100", check=True)
    info = open_prepared(p)
    assert info.shape == (3, 32, 32) and len(info.mean) == 3 and info.rows == {"train": 600, "val": 100, "test": 300}
    o, ot = folder_order(y), folder_order(yt)
    first = (x[o].transpose(0, 3, 1, 2), xt[ot].transpose(0, 3, 1, 2))
    for name, arrays in (("nhwc", (x[o], xt[ot])), ("nchw", first)):
        np.savez(tmp_path / f"{name}.npz", x=arrays[0], y=y[o], x_test=arrays[1], y_test=yt[ot])
        assert_same_content(p, prepare_dataset(PrepareConfig(val_rows=100, class_names=CLASSES),
                                               tmp_path / f"{name}.h5",
                                        npz=tmp_path / f"{name}.npz", log=lambda m: None))
    run_cli("jitter", "--prepared", p, "--out", pj, "--copies", "1", check=True)

    run_cli("teacher", "--prepared", p, "--out", t, "--arch", "cnn:8-16-32", "--members", "2", "--epochs", "4",
            "--batch-size", "32", "--lr", "0.005", "--threads", "1", check=True)
    run_cli("cache", "--teacher", t, "--transfer-set", pj, "--out", c, "--temperatures", "2", "--threads", "1",
            check=True)
    run_cli("student", "--cache", c, "--transfer-set", pj, "--out", s, "--arch", "dws:8/2-16/2", "--epochs", "8",
            "--lr", "0.01", "--batch-size", "32", "--temperature", "2", "--alpha", "0.5", check=True)
    run_cli("export", "--checkpoint", s, "--transfer-set", pj, "--out", tmp_path / "s.onnx", "--int8",
            tmp_path / "s.int8.onnx", "--teacher", t, "--no-mobile", "--calibration-rows", "300", "--raw-input",
            "--max-accuracy-drop", "5", check=True)
    run_cli("bench", "--teacher", t, "--candidate", f"student={tmp_path / 's.onnx'}",
            "--candidate", f"student-int8={tmp_path / 's.int8.onnx'}", "--prepared", p, "--out", tmp_path / "b.json",
            "--threads", "1", "--batches", "1", "--no-iobinding", "--warmup-count", "5", "--warmup-s", "0",
            "--min-count", "20", "--min-s", "0.02", "--trials", "3", check=True)

    metrics = json.loads(s.with_suffix(".metrics.json").read_text())
    export = json.loads((tmp_path / "s.export.json").read_text())
    bench = json.loads((tmp_path / "b.json").read_text())["models"]
    assert metrics["test_accuracy"] > 0.4, metrics  # chance is 0.1: shape and colour were learnt
    assert export["fp32"]["max_abs_diff_vs_torch"] < 1e-4 and export["variants"]["int8"]["written"]
    assert bench["teacher-ensemble"]["test_accuracy"] > 0.5, bench["teacher-ensemble"]
    assert export["graph"]["input"] == "shifted"  # per-channel normalisation in the graph: uint8 pixels in
    for name in ("student", "student-int8"):
        assert bench[name]["input_dtype"] == "uint8"
        assert abs(bench[name]["test_accuracy"] - metrics["test_accuracy"]) < 0.05
        assert bench[name]["runs"][0]["batch"] == 1 and bench[name]["runs"][0]["steady"]["p50"] > 0
