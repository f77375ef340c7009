"""Case 3 (and part of 6): corrupt or hostile HDF5 input gives one clean error, bounded memory, no crash.

Twenty seeded mutations of each of a prepared file and a cache are opened in a child process (so a
segfault or a hang fails the test) under an address-space limit (so a multi-GB allocation fails the
test).  Each must give a DataError/IntegrityError naming the file, or -- a flip in unused bytes --
exactly the original content.  Never different data, never another exception.
"""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.errors import DataError, IntegrityError
from pipeline.formats import h5seal as h5safe
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from tests.conftest import ROOT, run_cli


def _run_child(kind, original, tmp_path, seed, count=20):
    proc = subprocess.run([sys.executable, "-m", "tests.faultkit", kind, str(original), str(tmp_path), str(seed),
                           str(count)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = [line for line in lines if "outcome" in line]
    assert proc.returncode == 0, (f"child died with {proc.returncode} at {lines[-1] if lines else 'start'}:\n"
                                  f"{proc.stderr[-2000:]}")
    assert len(done) == count
    bad = [d for d in done if d["outcome"] not in ("same", "DataError", "IntegrityError")]
    assert not bad, bad
    return done


def test_prepared_mutations_fail_cleanly(tiny_prepared, tmp_path):
    done = _run_child("prepared", tiny_prepared, tmp_path, seed=6)
    assert sum(d["outcome"] != "same" for d in done) >= 10  # the mutations really hit something


def test_cache_mutations_fail_cleanly(tiny_cache, tmp_path):
    done = _run_child("cache", tiny_cache, tmp_path, seed=7)
    assert sum(d["outcome"] != "same" for d in done) >= 10


def test_flip_in_data_is_caught_by_checksum(tiny_prepared, tmp_path):
    bad = tmp_path / "p.h5"
    bad.write_bytes(tiny_prepared.read_bytes())
    with h5py.File(bad, "r+") as f:  # a valid file whose pixels changed after prepare sealed it
        f["train/x"][0, 0, 0] ^= 1
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        open_prepared(bad)


@pytest.mark.slow
def test_cli_truncated_prepared_and_cache(tiny_prepared, tiny_cache, tmp_path):
    p, c = tmp_path / "p.h5", tmp_path / "c.h5"
    p.write_bytes(tiny_prepared.read_bytes()[:len(tiny_prepared.read_bytes()) // 2])
    c.write_bytes(tiny_cache.read_bytes()[:-100])
    proc = run_cli("teacher", "--prepared", p, "--out", tmp_path / "t" / "e.onnx", "--members", "1")
    assert proc.returncode == 3 and str(p) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("student", "--cache", c, "--transfer-set", tiny_prepared, "--out", tmp_path / "s.ckpt")
    assert proc.returncode == 3 and str(c) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t" / "e.onnx").exists() and not (tmp_path / "s.ckpt").exists()


def _hostile(path, build):
    with h5py.File(path, "w", libver="latest") as f:  # latest: dense storage allows large attributes
        build(f)
        f.attrs[h5safe.DIGEST_ATTR] = "0" * 64  # present, so that verify goes on to check the content
    return path


def test_huge_declared_dataset_is_refused_before_reading(tmp_path):
    # A chunked dataset of 2^40 rows costs a few KiB on disk (unwritten chunks read as the fill value):
    # reading it would allocate 8 TiB.  It must be refused from its metadata alone.
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", (1 << 40,), np.int64, chunks=(1024,))
        f.attrs.update(schema="kd-cache/1", complete=True, rows=1 << 40, committed_rows=1 << 40)
        f.attrs[h5safe.DIGEST_ATTR] = "0" * 64
    with h5safe.open_untrusted(path, "cache") as f, pytest.raises(DataError, match="declares"):
        h5safe.digest(path, f)
    with pytest.raises(DataError, match="declares"):
        open_cache(path)


@pytest.mark.parametrize("build, fragment", [
    (lambda f: f.create_dataset("x", (4,), h5py.string_dtype()), "unsupported dtype"),
    (lambda f: f.create_dataset("x", (1 << 16, 1 << 10), np.float32, chunks=(1 << 16, 1 << 10)), "chunks"),
    (lambda f: f.attrs.create("big", np.zeros(1 << 18, np.float64)), "larger than"),
    (lambda f: f.create_dataset("x", data=np.array([1.0, np.nan], np.float32)), "NaN"),
])
def test_hostile_structures_are_refused(tmp_path, build, fragment):
    path = _hostile(tmp_path / "h.h5", build)
    with h5safe.open_untrusted(path, "file") as f, pytest.raises(DataError, match=fragment):
        h5safe.verify(path, f, "make prepare")


def _empty(split):
    def mutate(f):
        shape, dtype = f[f"{split}/x"].shape[1:], f[f"{split}/x"].dtype
        del f[split]
        f.create_dataset(f"{split}/x", shape=(0, *shape), dtype=dtype)
        f.create_dataset(f"{split}/y", shape=(0,), dtype=np.int64)
    return mutate


def test_prepared_labels_out_of_range_and_empty_split_are_refused(tiny_prepared, tmp_path):
    for mutate, fragment in [(lambda f: f["val/y"].__setitem__(0, 10), "labels outside"),
                             (lambda f: f["test/y"].__setitem__(0, -1), "labels outside"),
                             (_empty("train"), "the train split is empty"),
                             (_empty("test"), "the test split is empty")]:
        path = tmp_path / "p.h5"
        path.write_bytes(tiny_prepared.read_bytes())
        with h5py.File(path, "r+") as f:  # re-sealed: the checksum is not a signature, the checks still run
            mutate(f)
            h5safe.seal(f)
        with pytest.raises(DataError, match=fragment):
            open_prepared(path)
