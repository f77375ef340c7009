"""Many machines, on one: the cache and the student under ``torchrun --nnodes 2 --nproc-per-node 1`` (two
launchers standing for two nodes, a c10d rendezvous on 127.0.0.1), each "node" in its own working folder
with its own copy of the inputs (other paths, the same bytes), give what one process gives; and the
parts the two "hosts" wrote merge into the cache one process writes."""
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from pipeline.formats.cache import open_cache
from pipeline.models import load as load_checkpoint
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

CACHE = ["--device", "cpu", "--threads", "1", "--batch-size", "256", "--temperatures", "1,4", "--top-k", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args_of, cwd_of, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice at once, a c10d rendezvous on this host; node i runs
    ``-m commands *args_of(i)`` in ``cwd_of(i)``.  Which launcher gets which rank is the rendezvous's choice."""
    endpoint, rid = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rid, "--max-restarts", "0",
         "-m", "commands", *map(str, args_of(i))], cwd=cwd_of(i), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for o in out:
        assert o.returncode == 0, o.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hosts(tiny_teacher, tiny_prepared, tmp_path_factory):
    """Two "hosts": a working folder each, holding its own copy of the teacher and the transfer set."""
    d = tmp_path_factory.mktemp("hosts")
    for i in range(2):
        (d / f"host{i}").mkdir()
        shutil.copy(tiny_teacher, d / f"host{i}" / "teacher.onnx")
        shutil.copy(tiny_prepared, d / f"host{i}" / "set.h5")
    return d


def _same_content(a, b) -> None:
    """Every dataset, the diagnostics and the content attributes equal (provenance and provider aside)."""
    x, y = open_cache(a), open_cache(b)
    for name in ("topk/ids", "topk/logits", "topk/tail", "labels"):
        assert np.array_equal(x.read(name), y.read(name)), name
    assert x.diagnostics() == y.diagnostics() and x.member_accuracy == y.member_accuracy
    skip = {"provenance", "content_sha256", "provider"}
    assert {k: str(v) for k, v in x.attrs.items() if k not in skip} == {k: str(v) for k, v in y.attrs.items()
                                                                       if k not in skip}


def test_cache_on_two_nodes_merges_to_the_one_process_cache(hosts, tmp_path):
    one = tmp_path / "one.h5"
    run_cli("cache", "--teacher", hosts / "host0" / "teacher.onnx", "--transfer-set", hosts / "host0" / "set.h5",
            "--out", one, *CACHE, check=True)
    two_nodes(lambda i: ["cache", "--teacher", hosts / f"host{i}" / "teacher.onnx", "--transfer-set",
                         hosts / f"host{i}" / "set.h5", "--out", "c.h5", *CACHE], lambda i: hosts / f"host{i}")
    parts = sorted(hosts.glob("host*/c.part*of2.h5"))
    assert [p.name for p in parts] in (["c.part0of2.h5", "c.part1of2.h5"], ["c.part1of2.h5", "c.part0of2.h5"])
    assert {p.parent.name for p in parts} == {"host0", "host1"}  # one part on each host
    # the parts travel to one place (any folder) and are merged there; their recorded paths differ
    merged = tmp_path / "merged.h5"
    run_cli("cache", "merge", *[a for p in parts for a in ("--part", p)], "--out", merged, check=True)
    _same_content(merged, one)
    prov = json.loads(open_cache(merged).attrs["provenance"])
    assert {p["inputs"]["teacher0"]["path"] for p in prov["parts"]} == {
        str(hosts / "host0" / "teacher.onnx"), str(hosts / "host1" / "teacher.onnx")}
    run_cli("cache", "verify", merged, "--teacher", hosts / "host1" / "teacher.onnx", "--transfer-set",
            hosts / "host1" / "set.h5", "--sample-rows", "256", check=True)


def test_student_on_two_nodes_matches_one_process(tiny_cache, hosts, tmp_path):
    """DDP across the two nodes (gloo): the same global batches, each node its half, as one process."""
    args = ["--cache", tiny_cache, "--arch", "mlp:16", "--epochs", "2", "--batch-size", "100", "--temperature", "2",
            "--alpha", "1", "--seed", "3", "--threads", "1"]
    run_cli("student", *args, "--transfer-set", hosts / "host0" / "set.h5", "--out", tmp_path / "one.ckpt",
            check=True)
    two_nodes(lambda i: ["student", *args, "--transfer-set", "set.h5", "--out", "s.ckpt"], lambda i: hosts / f"host{i}")
    written = [p for p in hosts.glob("host*/s.ckpt")]
    assert len(written) == 1  # rank 0 writes, on whichever host the rendezvous made rank 0
    m = json.loads(written[0].with_suffix(".metrics.json").read_text())
    assert m["world_size"] == 2
    a, b = load_checkpoint(tmp_path / "one.ckpt")[0].state_dict(), load_checkpoint(written[0])[0].state_dict()
    for k in a:  # as test_student_modes: float32 summation order only (1.5e-8 measured there)
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
