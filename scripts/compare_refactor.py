"""Compare the artifacts of one pipeline run by the code before the formats-layer move (the
formats/ package of pipeline/) and after it, same seeds, same DATA path (provenance records paths):

    python scripts/compare_refactor.py BASE_DATA NEW_DATA

BASE_DATA holds the old layout (checkpoints ``.pt``, read with torch.load), NEW_DATA the new one
(``.ckpt``).  Prints, per artifact, whether the bytes are equal and, where they cannot be (the
exporter's per-node debug metadata, now stripped; a checkpoint's sha256 in its export's metadata),
whether everything else is.  Outputs kept: docs/checks/refactor-{full-size,smoke}.txt.
"""
import hashlib
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.formats.checkpoint import read_checkpoint
from pipeline.onnxio import strip_node_metadata

base, new = Path(sys.argv[1]), Path(sys.argv[2])


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


print("prepared file sha256 equal:", sha(base / "prepared/fashion-mnist.h5") == sha(new / "prepared/fashion-mnist.h5"))


def onnx_norm(p, blank=("checkpoint_sha256",)):
    m = strip_node_metadata(onnx.load(str(p)))
    for e in m.metadata_props:
        if e.key in blank:
            e.value = "-"
    return m.SerializeToString()


t0, t1 = base / "teachers/fashion-mnist/ensemble.onnx", new / "teachers/fashion-mnist/ensemble.onnx"
print("teacher ensemble.onnx: sha256 equal", sha(t0) == sha(t1),
      "| equal once the old file's node debug metadata is stripped", onnx_norm(t0) == onnx_norm(t1))
c0, c1 = base / "cache/fashion-mnist.h5", new / "cache/fashion-mnist.h5"
with h5py.File(c0, "r") as a, h5py.File(c1, "r") as b:
    names = []
    a.visit(names.append)
    data_eq = all(np.array_equal(a[n][()], b[n][()]) for n in names if isinstance(a[n], h5py.Dataset))
    diff_attrs = sorted(k for k in a.attrs if not np.array_equal(np.asarray(a.attrs[k]), np.asarray(b.attrs.get(k))))
    print(f"cache: content_sha256 equal {a.attrs['content_sha256'] == b.attrs['content_sha256']}; "
          f"every dataset bit-identical {data_eq}; attributes that differ {diff_attrs}")
for f in sorted((base / "students").glob("*.onnx")):
    g = new / "students" / f.name
    print(f"{f.name}: sha256 equal {sha(f) == sha(g)}; equal without node debug metadata and checkpoint_sha256: "
          f"{onnx_norm(f) == onnx_norm(g)}")
for name in ("fashion-mnist-kd", "fashion-mnist-hard"):
    old = torch.load(base / f"students/{name}.pt", weights_only=True)["state_dict"]
    ck = read_checkpoint(new / f"students/{name}.ckpt")
    print(f"{name}: checkpoint weights bit-identical",
          list(old) == list(ck.state) and all(np.array_equal(old[k].numpy(), ck.state[k]) for k in old))
