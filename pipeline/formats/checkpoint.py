"""Model checkpoints, schema ``kd-checkpoint/1``: teacher members and students, one format, no pickle.

Layout (docs/formats.md, "checkpoint")::

    /                attrs: schema, role ("student" | "teacher-member"), arch, input_shape (JSON),
                            class_names (JSON), norm (JSON: scale, mean, std), state_keys (JSON, the
                            state dict's order), meta (JSON, the role's fields), provenance (JSON),
                            content_sha256 (the seal)
    /state/<name>    the state dict's tensors as numpy arrays (float32 weights, int64 counters)

``meta`` of a student: temperature, alpha, epoch (the chosen one); of a teacher member: key (what
determined its weights: prepared file, settings, index) and val_accuracy.

An HDF5 file of plain arrays instead of ``torch.save``'s pickle: reading one can never run code,
the reader needs no torch (export and bench read metadata without it), and the seal makes a
corrupt or truncated checkpoint a one-line error like every other artifact.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.formats import h5seal
from pipeline.formats.h5write import H5Output

SCHEMA = "kd-checkpoint/1"
ROLES = {"student": "make student", "teacher-member": "make teacher"}
WHAT = "checkpoint"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A network's weights and what is needed to rebuild and use it."""

    role: str
    arch: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    norm: dict[str, float]
    state: dict[str, np.ndarray]
    meta: dict[str, Any]
    provenance: dict[str, Any]


def write_checkpoint(path: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` (normally a ``.partial``) and seal it; a failed write is raised as
    the OSError it was (:mod:`pipeline.formats.h5write`)."""
    if ckpt.role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {ckpt.role!r}")
    with H5Output(path, "w") as out:
        f = out.f
        f.attrs.update(schema=SCHEMA, role=ckpt.role, arch=ckpt.arch, input_shape=json.dumps(list(ckpt.input_shape)),
                       class_names=json.dumps(list(ckpt.class_names)), norm=json.dumps(ckpt.norm),
                       state_keys=json.dumps(list(ckpt.state)), meta=json.dumps(ckpt.meta),
                       provenance=json.dumps(ckpt.provenance))
        g = f.create_group("state")
        for name, value in ckpt.state.items():
            g.create_dataset(name, data=np.asarray(value))
        out.flush()  # a failed write is raised here, never sealed over
        h5seal.seal(f)
    return Path(path)


def read_checkpoint(path: Path, role: str | None = None) -> Checkpoint:
    """Read and check a checkpoint (``role``: the one expected); DataError with one line otherwise."""
    path = Path(path)
    rebuild = ROLES.get(role or "student", "make student")
    if path.is_file() and path.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n":
        raise DataError(f"{path}: not a {SCHEMA} checkpoint (not an HDF5 file; a torch.save pickle is "
                        f"never loaded, it could run code); rebuild with `{rebuild}`")
    with h5seal.open_untrusted(path, WHAT, rebuild) as f:
        h5seal.check_schema(path, f, SCHEMA, WHAT, rebuild)
        h5seal.verify(path, f, rebuild)
        a = f.attrs
        try:
            got = str(a["role"])
            keys = json.loads(a["state_keys"])
            ckpt = Checkpoint(got, str(a["arch"]), tuple(int(d) for d in json.loads(a["input_shape"])),
                              tuple(str(c) for c in json.loads(a["class_names"])), json.loads(a["norm"]),
                              {k: f["state"][k][()] for k in keys}, json.loads(a["meta"]),
                              json.loads(a["provenance"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: corrupt {WHAT}: missing or malformed field ({type(e).__name__}: "
                            f"{str(e)[:80]}); rebuild with `{rebuild}`") from None
    if role is not None and got != role:
        raise DataError(f"{path}: a {got} checkpoint, expected a {role} one")
    if len(ckpt.class_names) < 2 or not ckpt.input_shape:
        raise DataError(f"{path}: corrupt {WHAT}: {len(ckpt.class_names)} classes, input shape {ckpt.input_shape}")
    return ckpt
