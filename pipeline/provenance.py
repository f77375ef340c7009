"""Provenance: what every artifact records about how it was made, and the checks that use it.

A provenance record is a JSON-ready dict: the stage, its settings, the sha256 of each input file,
package versions, and (where a runtime ran) the execution provider that actually ran.  A stage
refuses an input whose recorded hash does not match the file it is asked to combine it with, and
says which make target rebuilds it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from pipeline.errors import IntegrityError

PACKAGE = "edge-distill"
_CHUNK = 1 << 20  # 1 MiB reads: large enough to be I/O bound, small enough to bound memory


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (memoised on path, size and mtime within one process)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour an artifact depends on."""
    out = {"python": platform.python_version()}
    for name in (PACKAGE, "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "numpy", "h5py"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        # --no-optional-locks: reading the revision never writes the repository.  A plain status refreshes
        # the index through index.lock, and under a file-size limit (ulimit -f) git dies mid-write and leaves
        # that lock behind, which blocks every later git command in the checkout.
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record(stage: str, settings: dict[str, Any], inputs: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """A provenance record for an artifact of ``stage`` made from ``inputs`` (name -> file)."""
    return {
        "stage": stage,
        "settings": settings,
        "inputs": {name: {"path": str(p), "sha256": sha256_file(p)} for name, p in inputs.items()},
        "versions": versions(),
        **extra,
    }


def check_recorded_inputs(rec: dict[str, Any], what: str, rebuild: str, skip: tuple[str, ...] = ("transfer_set",
                                                                                                 )) -> None:
    """Refuse when an input recorded in provenance ``rec`` still exists at its recorded path but with
    other content (a teacher retrained since the cache was made); inputs no longer there (an
    artifact from another machine) are not judged.  ``skip``: inputs the caller checks itself."""
    for name, entry in sorted(rec.get("inputs", {}).items()):
        path = Path(entry.get("path", ""))
        if name not in skip and entry.get("path") and path.is_file():
            check_lineage(path, entry, f"{name}, an input of {what}", rebuild)


def recorded_input(rec: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The entry ``{"path", "sha256"}`` of input ``name`` in provenance ``rec``, or None."""
    entry = (rec or {}).get("inputs", {}).get(name)
    return entry if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) else None


def splits_source(rec: dict[str, Any]) -> str | None:
    """The sha256 of the prepared file whose val and test splits and normalisation a prepared file with
    provenance ``rec`` copies bit for bit (a jittered transfer set's source, ``distill jitter``), or None."""
    entry = recorded_input(rec, "prepared") if (rec or {}).get("stage") == "jitter" else None
    return entry["sha256"] if entry else None


def trained_on(rec: dict[str, Any]) -> list[str | None]:
    """The transfer sets a student (its checkpoint's provenance ``rec``) may be exported or scored with: the
    one it was trained on, and the file that one was jittered from (the same val and test splits and
    normalisation, bit for bit; ``transfer_source_sha256``, recorded by the student stage)."""
    entry = recorded_input(rec, "transfer_set")
    return [entry["sha256"] if entry else None, (rec or {}).get("transfer_source_sha256")]


def check_lineage(path: Path, recorded: str | dict[str, Any] | list[str | None] | None, what: str,
                  rebuild: str) -> None:
    """The lineage check of every stage that reads an artifact made from another: refuse (IntegrityError,
    exit 4) unless ``path`` is the very file whose sha256 was ``recorded`` when ``what`` was made from it.

    ``recorded`` is a sha256, a provenance entry ``{"path", "sha256"}`` (its path is then named too),
    or a list of sha256 any of which is the file (a transfer set and the prepared file it was jittered
    from, whose val and test splits and normalisation it copies: :func:`splits_source`); None (the
    artifact records no such input) is refused as well: nothing to check it against.  The message
    names both files and the make target that rebuilds what depends on them.
    """
    if isinstance(recorded, list):
        accepted, was = [r for r in recorded if r], None
    else:
        entry = recorded if isinstance(recorded, dict) else {"sha256": recorded}
        accepted, was = [entry["sha256"]] if entry.get("sha256") else [], entry.get("path")
    if not accepted:
        raise IntegrityError(f"{path}: {what} records no sha256 to check this file against; rebuild with "
                             f"`{rebuild}`")
    actual = sha256_file(path)
    if actual not in accepted:
        made = f" (recorded from {was})" if was and Path(was) != Path(path) else ""
        also = " (nor the file it was jittered from)" if len(accepted) > 1 else ""
        raise IntegrityError(
            f"{path}: not the file {what} was made from{also}: sha256 {actual[:12]} != recorded "
            f"{accepted[0][:12]}{made}; give that file, or rebuild with `{rebuild}`")
