"""Loading PyTorch checkpoints without running code from them.

``torch.load(weights_only=True)`` only: a checkpoint is tensors, numbers, strings and containers
(the project's own, with optimizer and RNG state, are exactly that).  A pickle that needs any other
global -- the way a malicious file runs code -- is refused with a one-line DataError naming the
global; torch's own message (several lines, inviting ``weights_only=False``) is not passed on.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from pipeline.errors import DataError


def load(path: Path) -> Any:
    """The checkpoint at ``path``, weights-only; FileNotFoundError passes, anything else is a DataError."""
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        why = next((l for l in lines if "Unsupported" in l or "GLOBAL" in l), lines[-1] if lines else "")
        raise DataError(f"{path}: refused, the checkpoint needs code to load (weights-only loading): "
                        f"{why.split(' was not')[0][:160]}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt zip or pickle raises many types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
