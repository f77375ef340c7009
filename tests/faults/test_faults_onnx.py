"""Case 4: hostile or unsuitable ONNX files are rejected before any long work starts.

"Before long work" is checked, not assumed: the transfer set's rows (cache) and the timing workers
and predictions (bench) are replaced by tripwires that fail the test if they are reached.  The
tripwires are shown to be live: a good model reaches them, and a cache that reads rows before its
check (a deliberately wrong ordering) trips them.  "Before any row is read" means before the stage
reads rows to run: opening the prepared file already verifies its seal, which hashes it in full.
"""
import os

import numpy as np
import onnx
import pytest

from pipeline import inference
from pipeline.errors import DataError
from pipeline.formats.prepared import Prepared
from stages.bench import BenchConfig, benchmark
from stages.bench import stage as bench
from stages.cache import CacheConfig, cache_soft_targets
from stages.cache import stage as cache
from tests.conftest import run_cli
from tests.faultkit import external_model, linear_model


def _random_bytes(d):
    p = d / "random.onnx"
    p.write_bytes(os.urandom(4096))
    return p


def _truncated(d):
    good = linear_model(d / "good.onnx").read_bytes()
    p = d / "truncated.onnx"
    p.write_bytes(good[: len(good) * 2 // 3])
    return p


def _outside(d):
    (d.parent / "w.bin").write_bytes(b"\0" * 31360)
    return external_model(d / "m.onnx", "../w.bin")


def _absolute(d):
    target = d.parent / "abs.bin"
    target.write_bytes(b"\0" * 31360)
    return external_model(d / "m.onnx", str(target))


def _symlink(d):
    (d.parent / "real.bin").write_bytes(b"\0" * 31360)
    (d / "w.bin").symlink_to(d.parent / "real.bin")
    return external_model(d / "m.onnx", "w.bin")


def _symlinked_folder(d):
    (d.parent / "elsewhere").mkdir()
    (d.parent / "elsewhere" / "w.bin").write_bytes(b"\0" * 31360)
    (d / "sub").symlink_to(d.parent / "elsewhere")
    return external_model(d / "m.onnx", "sub/w.bin")


def _hardlink(d):
    (d.parent / "real.bin").write_bytes(b"\0" * 31360)
    os.link(d.parent / "real.bin", d / "w.bin")
    return external_model(d / "m.onnx", "w.bin")


def _sparse_outside(d):
    p = linear_model(d / "m.onnx")
    m = onnx.load(str(p))
    sp = m.graph.sparse_initializer.add()  # an unused sparse initialiser whose values live in /etc
    sp.dims.extend([4])
    sp.values.name, sp.values.data_type = "s", onnx.TensorProto.FLOAT
    sp.values.data_location = onnx.TensorProto.EXTERNAL
    sp.values.dims.extend([1])
    e = sp.values.external_data.add()
    e.key, e.value = "location", "/etc/hostname"
    onnx.save(m, str(p))
    return p


BAD = {
    "random bytes": (_random_bytes, "not a readable ONNX model|not a usable ONNX model|cannot load"),
    "truncated": (_truncated, "not a readable ONNX model|not a usable ONNX model|cannot load"),
    "IR too new": (lambda d: linear_model(d / "m.onnx", ir_version=14), "IR version 14 is newer"),
    "external ../": (_outside, "outside the model's folder"),
    "external absolute": (_absolute, "outside the model's folder"),
    "external symlink": (_symlink, "symbolic link"),
    "external symlinked folder": (_symlinked_folder, "outside the model's folder"),
    "external hard link": (_hardlink, "hard link"),
    "sparse external": (_sparse_outside, "outside the model's folder"),
    "wrong class count": (lambda d: linear_model(d / "m.onnx", classes=7), "7 classes, the (data|transfer set) has 10"),
    "wrong input dtype": (lambda d: linear_model(d / "m.onnx", dtype=onnx.TensorProto.DOUBLE),
                          "type tensor\\(double\\)"),
    "wrong input shape": (lambda d: linear_model(d / "m.onnx", in_shape=(32, 32)), "has shape"),
    "fixed batch": (lambda d: linear_model(d / "m.onnx", batch=1), "fixed batch size"),
}


@pytest.fixture
def tripwire(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("long work started before the model was checked")

    for reader in ("load", "load_raw", "rows_reader", "blocks", "labels", "take"):  # every way rows leave the file
        monkeypatch.setattr(Prepared, reader, boom)
    return boom


@pytest.mark.parametrize("case", list(BAD))
def test_cache_rejects_before_reading_rows(case, tiny_prepared, tmp_path, tripwire):
    d = tmp_path / "models"
    d.mkdir()
    model = BAD[case][0](d)
    out = tmp_path / "c.h5"
    cfg = CacheConfig(temperatures=(2.0,), device="cpu", threads=1)
    with pytest.raises(DataError, match=BAD[case][1]) as e:
        cache_soft_targets(cfg, [model], tiny_prepared, out, log=lambda m: None)
    assert str(model) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists()


def test_the_tripwire_is_on_the_cache_path(tiny_prepared, tmp_path, tripwire):
    """Control: with a good model the cache does reach a patched reader, so the tests above would
    notice a stage that read rows before checking its teachers (and not pass vacuously)."""
    cfg = CacheConfig(temperatures=(2.0,), device="cpu", threads=1)
    with pytest.raises(AssertionError, match="long work started"):
        cache_soft_targets(cfg, [linear_model(tmp_path / "good.onnx")], tiny_prepared, tmp_path / "c.h5",
                           log=lambda m: None)


def test_the_tripwire_fires_on_a_wrong_ordering(tiny_prepared, tmp_path, tripwire, monkeypatch):
    """A cache stage that peeks at the first rows before it checks the teachers (the ordering the
    tests above forbid) is caught by the tripwire even with a model the check would refuse."""
    opened = []
    real_open, real_teachers = cache.open_prepared, cache.Teachers

    def open_prepared(path):
        opened.append(real_open(path))
        return opened[-1]

    def peeking_teachers(*a, **k):
        opened[-1].load("train", 0, 1)  # rows first: the wrong order
        return real_teachers(*a, **k)

    monkeypatch.setattr(cache, "open_prepared", open_prepared)
    monkeypatch.setattr(cache, "Teachers", peeking_teachers)
    bad = linear_model(tmp_path / "seven.onnx", classes=7)
    with pytest.raises(AssertionError, match="long work started"):
        cache_soft_targets(CacheConfig(temperatures=(2.0,), device="cpu", threads=1), [bad], tiny_prepared,
                           tmp_path / "c.h5", log=lambda m: None)


def test_good_external_data_is_accepted(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    model = external_model(d / "m.onnx", "w.bin", data_file=d / "w.bin")  # inside the folder, one link
    sess = inference.session(model, "cpu")
    inference.check_io(model, sess, (28, 28), 10)
    # and the weights it runs are the external file's: x W with W read from w.bin by numpy
    w = np.frombuffer((d / "w.bin").read_bytes(), np.float32).reshape(784, 10)
    x = np.random.default_rng(0).normal(size=(3, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x.reshape(3, 784) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["wrong class count", "wrong input shape", "external ../"])
def test_bench_rejects_before_timing(case, tiny_teacher, tiny_prepared, tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    model = BAD[case][0](d)

    def boom(*a, **k):
        raise AssertionError("timing started before the models were checked")

    monkeypatch.setattr(bench.launcher, "run_isolated", boom)
    monkeypatch.setattr(bench.inference, "predict_proba", boom)
    out = tmp_path / "b.json"
    with pytest.raises(DataError, match=BAD[case][1]):
        benchmark(BenchConfig(), tiny_teacher, {"s": model}, tiny_prepared, out, tmp_path / "b.md",
                  tmp_path / "b.csv", log=lambda m: None)
    assert not out.exists() and not (tmp_path / "b.md").exists()
    # control: with a good candidate the bench does reach the tripwires (they are on its path)
    with pytest.raises(AssertionError, match="timing started before"):
        benchmark(BenchConfig(), tiny_teacher, {"s": linear_model(d / "good.onnx")}, tiny_prepared, out,
                  tmp_path / "b.md", tmp_path / "b.csv", log=lambda m: None)


def test_cli_exit_codes(tiny_teacher, tiny_prepared, tmp_path):
    bad = _random_bytes(tmp_path)
    proc = run_cli("cache", "--teacher", bad, "--transfer-set", tiny_prepared, "--out", tmp_path / "c.h5",
                   "--device", "cpu")
    assert proc.returncode == 3 and str(bad) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    wrong = linear_model(tmp_path / "seven.onnx", classes=7)
    proc = run_cli("bench", "--teacher", tiny_teacher, "--candidate", f"s={wrong}", "--prepared", tiny_prepared,
                   "--out", tmp_path / "b.json")
    assert proc.returncode == 3 and "gives 7 classes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "b.json").exists()
