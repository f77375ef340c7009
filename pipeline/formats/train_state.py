"""A training run's resumable state, schema ``kd-train-state/1``: what a killed teacher member or student resumes from.

Written after every finished epoch by the teacher stage (``member<i>.state`` beside the ensemble) and
the student stage (``<out stem>.state`` beside the checkpoint), read only by the stage that wrote it
(through :mod:`pipeline.resume`), removed once the checkpoint it leads to is published.  It holds
everything that decides the rest of the run, so that a resumed run ends with the same weights as an
uninterrupted one: the network's and the best epoch's weights, the optimizer's and the scheduler's state, the
random generators' states, the epoch count and the history.

Layout (docs/formats.md, "train state")::

    /                 attrs: schema, key (JSON: what determined the run: data, settings, member index),
                             tree (JSON: the nested state with every array replaced by a reference),
                             content_sha256 (the seal)
    /arrays/<n>       array n of the tree (float32 weights and buffers, uint8 generator states, ...)

The tree is plain JSON with tagged containers, so that optimizer states keep their integer keys and
tuples: ``{"@array": n}``, ``{"@dict": [[key, value], ...]}``, ``{"@tuple": [...]}``; lists, strings,
numbers, booleans and null stand for themselves.  Like every artifact here it is HDF5 of plain arrays
(no pickle: reading it can never run code) and sealed, so a truncated or edited state is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.formats import h5seal
from pipeline.formats.h5write import H5Output

SCHEMA = "kd-train-state/1"
WHAT = "training state"


def _encode(obj: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        arrays.append(obj)
        return {"@array": len(arrays) - 1}
    if isinstance(obj, dict):
        return {"@dict": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"@tuple": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a {WHAT}")


def _decode(obj: Any, arrays: dict[int, np.ndarray]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if "@array" in obj:
            return arrays[int(obj["@array"])]
        if "@tuple" in obj:
            return tuple(_decode(v, arrays) for v in obj["@tuple"])
        if "@dict" in obj:
            return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["@dict"]}
        raise ValueError(f"unknown tag {sorted(obj)[:1]}")
    return obj


def write_train_state(path: Path, key: dict[str, Any], state: Any) -> Path:
    """Write ``state`` (nested dicts, lists, tuples, numpy arrays and JSON scalars) with the run's
    ``key`` to ``path`` (normally a ``.partial``) and seal it."""
    arrays: list[np.ndarray] = []
    tree = _encode(state, arrays)
    with H5Output(path, "w") as out:
        f = out.f
        f.attrs.update(schema=SCHEMA, key=json.dumps(key, sort_keys=True), tree=json.dumps(tree))
        g = f.create_group("arrays")
        for i, a in enumerate(arrays):
            g.create_dataset(str(i), data=np.array(a, order="C"))  # ascontiguousarray would make 0-d arrays 1-d
        out.flush()  # a failed write is raised here, never sealed over
        h5seal.seal(f)
    return Path(path)


def read_train_state(path: Path) -> tuple[dict[str, Any], Any]:
    """``(key, state)`` of a training state; DataError (exit 3) when it is not a readable, sealed one
    (IntegrityError, exit 4, when its seal fails).  The message offers ``rm <path>``: a state is resume
    data only, so deleting it (and training from the first epoch) is the one remedy, for any stage."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {WHAT} not found")  # nothing to delete: rebuild's advice would not apply
    rebuild = f"rm {path}"
    with h5seal.open_untrusted(path, WHAT, rebuild) as f:
        h5seal.check_schema(path, f, SCHEMA, WHAT, rebuild)
        h5seal.verify(path, f, rebuild)
        try:
            key = json.loads(f.attrs["key"])
            arrays = {int(n): np.asarray(ds[()]) for n, ds in f["arrays"].items()}
            state = _decode(json.loads(f.attrs["tree"]), arrays)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: corrupt {WHAT}: {type(e).__name__}: {str(e)[:80]}") from None
    return key, state
