"""Case 10: the cache is bitwise identical across onnxruntime thread counts and batch sizes (CPU).

Measured, not assumed: with onnxruntime 1.31's CPU provider (MLAS) the teachers' logits come out
bit for bit the same for batch sizes 1 to 1200 and 1 or 2 threads, for MLP and CNN members alike, so
no tolerance is needed; soft targets and diagnostics are computed from them in numpy, batch by batch.
If a future onnxruntime or CPU breaks this, this test is where it shows.  (Two seeded student runs
giving identical weights: tests/e2e/test_pipeline.py::test_seeded_students_are_identical.)
"""
import h5py
import numpy as np
import pytest

from stages.cache import CacheConfig, cache_soft_targets
from stages.prepare import PrepareConfig, prepare_dataset
from stages.teacher import TeacherConfig, train_teachers
from tests.conftest import synthetic_images

QUIET = dict(log=lambda m: None)


def _content(path):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            elif name.startswith("diagnostics/"):
                out[name] = dict(obj.attrs)
        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn")
    x, y = synthetic_images(700)
    xt, yt = synthetic_images(100, seed=1)
    np.savez(d / "c.npz", x=x[:, None], y=y, x_test=xt[:, None], y_test=yt)
    prepared = prepare_dataset(PrepareConfig(val_rows=100), d / "p.h5", npz=d / "c.npz")
    cfg = TeacherConfig(members=2, arch="cnn:4-8-16", epochs=1, threads=1, max_shift=1)
    return train_teachers(cfg, prepared, d / "t" / "e.onnx", **QUIET), prepared


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cache_bitwise_identical_across_threads_and_batches(kind, tiny_teacher, tiny_prepared, cnn_teacher, tmp_path):
    teacher, prepared = (tiny_teacher, tiny_prepared) if kind == "mlp" else cnn_teacher
    runs = [(1, 256), (2, 256), (1, 7), (2, 1000)]
    contents = []
    for threads, batch in runs:
        cfg = CacheConfig(temperatures=(1.0, 4.0), device="cpu", threads=threads, batch_size=batch)
        out = cache_soft_targets(cfg, [teacher], prepared, tmp_path / f"c{threads}-{batch}.h5", **QUIET)
        contents.append(_content(out))
    ref = contents[0]
    for (threads, batch), got in zip(runs[1:], contents[1:]):
        assert got.keys() == ref.keys()
        for name in ref:
            if isinstance(ref[name], dict):
                assert got[name].keys() == ref[name].keys()
                for k in ref[name]:
                    np.testing.assert_array_equal(got[name][k], ref[name][k], err_msg=f"{name}.{k}")
            else:
                assert got[name].tobytes() == ref[name].tobytes(), f"{name} differs at threads {threads} batch {batch}"
