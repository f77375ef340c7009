"""What a finished cache recorded about how it was made: its member weights and its teachers' input contracts."""
from __future__ import annotations

import json

import numpy as np

from pipeline import soft
from pipeline.errors import DataError
from pipeline.formats.cache import CacheInfo
from pipeline.formats.onnx_model import InputContract


def recorded_weights(c: CacheInfo) -> np.ndarray | None:
    """The member weights a cache was combined with (None: equal; caches before them have none)."""
    return soft.normalise_weights(json.loads(c.attrs.get("member_weights", "[]")), c.members)


def recorded_contracts(c: CacheInfo) -> list[InputContract] | None:
    """The input contract each teacher file was fed under (None for caches made before contracts,
    which fed every teacher the transfer set's normalisation: the default)."""
    if "teacher_inputs" not in c.attrs:
        return None
    try:
        return [InputContract.from_dict(r["input"]) for r in json.loads(c.attrs["teacher_inputs"])]
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{c.path}: malformed teacher_inputs attribute ({e})") from None


def weights_list(weights: np.ndarray | None, members: int) -> list[float]:
    return weights.tolist() if weights is not None else [1.0 / members] * members


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))
