"""The views cache: K views of every transfer row, each 8 bytes of parameters and the
teacher's outputs for it; the student re-makes exactly the pixels the teacher saw."""
import json
import shutil

import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline import soft as sm
from pipeline import views
from pipeline.errors import DataError, IntegrityError
from pipeline.formats import h5seal
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.cache import (
    AddTemperatureConfig,
    CacheConfig,
    MergeConfig,
    VerifyConfig,
    add_temperature,
    cache_soft_targets,
    merge,
    verify,
)
from stages.student import StudentConfig, distill_student
from stages.student.viewloader import ViewLoader
from tests.conftest import run_cli

QUIET = dict(log=lambda m: None)
BASE = dict(temperatures=(1.0, 2.0), batch_size=256, device="cpu", threads=1)
MIX = dict(views=4, view_max_shift=2, view_flip=0.5, view_mixup=0.5)


@pytest.fixture(scope="module")
def views_cache(tiny_teacher, tiny_prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    return cache_soft_targets(CacheConfig(**BASE, **MIX), [tiny_teacher], tiny_prepared, d / "v.h5", **QUIET)


def test_one_view_is_the_plain_cache(tiny_teacher, tiny_prepared, tiny_cache, tmp_path):
    one = open_cache(cache_soft_targets(CacheConfig(**BASE, views=1), [tiny_teacher], tiny_prepared,
                                        tmp_path / "k1.h5", **QUIET))
    plain = open_cache(tiny_cache)  # built with temperatures 1, 2, 4 and the same batch size
    for name in ("logits", "labels"):
        assert np.array_equal(one.read(name), plain.read(name)), name
    assert one.views["count"] == 1 and (one.read("view_params") == 0).all()


def test_layout_and_what_the_teacher_saw(views_cache, tiny_teacher, tiny_prepared):
    c, info = open_cache(views_cache), open_prepared(tiny_prepared)
    n = info.rows["train"]
    assert (c.rows, c.source_rows, c.views["count"], c.views["version"]) == (4 * n, n, 4, views.VERSION)
    spec = views.spec_of(c.views, views_cache)
    assert np.array_equal(c.read("view_params"), views.params(spec, 0, n, n))  # the recorded seed's draw
    assert np.array_equal(c.labels(), np.repeat(info.load("train")[1], 4))
    assert c.read("labels").dtype == np.int8 and np.array_equal(c.read("labels"), info.load("train")[1])  # once a row
    # The student's batch of views, run through the teacher by hand, gives the stored logits bit for bit.
    loader = ViewLoader(c, info, "soft", 2.0)
    src, view = np.array([0, 5, 17, n - 1]), np.array([1, 3, 2, 0])
    x, t, y = loader.batch(src, view)
    sess = ort.InferenceSession(str(tiny_teacher), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(got.astype(np.float16), c.read("logits")[src * 4 + view])  # as stored: float16
    assert np.array_equal(t.numpy(), sm.combine_soft_targets(got.astype(np.float16), 2.0)) and np.array_equal(y.numpy(),
                                                                                           info.load("train")[1][src])


def test_verify_rebuilds_views_and_catches_edited_parameters(views_cache, tiny_teacher, tiny_prepared, tmp_path):
    rep = verify(VerifyConfig(sample_rows=400), views_cache, [tiny_teacher], tiny_prepared, **QUIET)
    assert rep["max_abs_logit_diff"] == 0.0 and rep["view_param_mismatches"] == 0
    bad = tmp_path / "bad.h5"
    shutil.copy(views_cache, bad)
    with h5py.File(bad, "r+") as f:
        f["view_params"][:] = f["view_params"][:] ^ np.uint8(1)  # every view claims another flip / shift
        h5seal.seal(f)  # a consistent file: only re-making the views can tell
    with pytest.raises(IntegrityError, match="view parameter mismatches"):
        verify(VerifyConfig(sample_rows=400), bad, [tiny_teacher], tiny_prepared, **QUIET)


def test_float16_logits_stored_targets_and_add_temperature(tiny_teacher, tiny_prepared, tmp_path):
    """Targets stored beside float16 logits are computed from the rounded logits: the file agrees with
    itself, add-temperature stores the new T the same way, and verify recomputes them."""
    out = cache_soft_targets(CacheConfig(**BASE, views=2, store_soft=True), [tiny_teacher], tiny_prepared,
                             tmp_path / "h.h5", **QUIET)
    c = open_cache(out)
    logits = c.read("logits")
    assert logits.dtype == np.float16 and np.array_equal(c.stored_soft(1.0),
                                                         sm.combine_soft_targets(logits.astype(np.float32), 1.0))
    add_temperature(AddTemperatureConfig(temperatures=(4.0,)), out, **QUIET)
    c = open_cache(out)
    assert c.soft_temperatures == (1.0, 2.0, 4.0)
    assert np.array_equal(c.stored_soft(4.0), sm.combine_soft_targets(logits.astype(np.float32), 4.0))
    assert c.views["count"] == 2 and verify(VerifyConfig(), out, [tiny_teacher], tiny_prepared, **QUIET)


def test_student_trains_from_views(views_cache, tiny_prepared, tmp_path):
    cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=0.5)
    out = distill_student(cfg, views_cache, tiny_prepared, tmp_path / "s.ckpt", tmp_path / "s.json", **QUIET)
    m = json.loads((tmp_path / "s.json").read_text())
    assert out.is_file() and m["train_rows"] == open_prepared(tiny_prepared).rows["train"]  # one view a row


def test_student_mixup_is_seeded_and_changes_the_training(views_cache, tiny_prepared, tmp_path):
    """--mixup mixes the drawn views' rows and targets: the same seed gives the same student, and it is
    not the student without mixing."""
    runs = {}
    for name, mix in (("a", 0.5), ("b", 0.5), ("off", 0.0)):
        cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=0.5, mixup=mix)
        distill_student(cfg, views_cache, tiny_prepared, tmp_path / f"{name}.ckpt", tmp_path / f"{name}.json", **QUIET)
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["a"]["settings"]["mixup"] == 0.5 and runs["a"]["history"] == runs["b"]["history"]
    assert runs["a"]["checkpoint_sha256"] == runs["b"]["checkpoint_sha256"]
    assert [h["loss"] for h in runs["a"]["history"]] != [h["loss"] for h in runs["off"]["history"]]


def test_merged_view_shards_equal_one_run(views_cache, tiny_teacher, tiny_prepared, tmp_path):
    parts = [cache_soft_targets(CacheConfig(**BASE, **MIX, shard=f"{i}/2"), [tiny_teacher], tiny_prepared,
                                tmp_path / "s.h5", **QUIET) for i in range(2)]
    merged = open_cache(merge(MergeConfig(), parts, tmp_path / "m.h5", **QUIET))
    whole = open_cache(views_cache)
    for name in ("logits", "labels", "view_params"):
        assert np.array_equal(merged.read(name), whole.read(name)), name
    assert merged.views == whole.views and merged.source_rows == whole.source_rows


@pytest.mark.parametrize("args, message", [
    (["--views", "-1"], "views must be >= 0"),
    (["--views", "4", "--view-mixup", "1.5"], "mixup is a probability in \\[0, 1\\]"),
    (["--views", "4", "--view-flip", "-0.5"], "flip is a probability in \\[0, 1\\]"),
    (["--views", "4", "--view-max-shift", "40"], "does not fit images of 28 x 28"),
    (["--logits-dtype", "int8"], "logits_dtype must be float32 or float16"),
])
def test_bad_view_settings_are_usage_errors(args, message, tiny_teacher, tiny_prepared, tmp_path):
    proc = run_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", tmp_path / "c.h5",
                   "--device", "cpu", *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and __import__("re").search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


def test_views_of_another_function_version_are_refused(views_cache, tiny_prepared, tmp_path):
    other = tmp_path / "v2.h5"
    shutil.copy(views_cache, other)
    with h5py.File(other, "r+") as f:
        f.attrs["views"] = json.dumps({**json.loads(f.attrs["views"]), "version": 99})
        h5seal.seal(f)
    with pytest.raises(DataError, match="view function version 99"):
        ViewLoader(open_cache(other), open_prepared(tiny_prepared), "soft", 2.0)
    proc = run_cli("student", "--cache", other, "--transfer-set", tiny_prepared, "--out", tmp_path / "s.ckpt",
                   "--epochs", "1", "--temperature", "2")
    assert proc.returncode == 3 and "view function version 99" in proc.stderr and not (tmp_path / "s.ckpt").exists()


def test_an_epoch_derived_in_chunks_is_its_batches_made_one_by_one(views_cache, tiny_prepared, monkeypatch):
    monkeypatch.setattr("stages.student.batches.CHUNK_BYTES", 4 * 10 * 16 * 2)  # chunks of 2 batches of 16
    loader = ViewLoader(open_cache(views_cache), open_prepared(tiny_prepared), "soft", 2.0)
    gen = torch.Generator().manual_seed(3)  # the epoch's draws, as the loader makes them
    order = torch.randperm(loader.n, generator=gen).numpy()
    view = torch.randint(0, loader.used, (loader.n,), generator=gen).numpy()
    got = list(loader.epoch(torch.Generator().manual_seed(3), 16))
    assert len(got) == loader.steps(16)
    for b, (x, t, y) in enumerate(got):
        want = loader.batch(loader.rows[order[16 * b:16 * b + 16]], view[16 * b:16 * b + 16])
        assert all(torch.equal(g, w) for g, w in zip((x, t, y), want)), b
