"""Sizes of files, in bytes and KiB (1024 bytes, one decimal as the bench report prints them), as JSON.

    python3 scripts/file_sizes.py FILE... > sizes.json

Standard library only.  docs/sources/baseline-ref/sizes.json was written by it (see docs/sources/README.md).
"""
import json
import sys
from pathlib import Path


def sizes(paths: list[str]) -> dict:
    return {Path(p).name: {"bytes": Path(p).stat().st_size, "KiB": round(Path(p).stat().st_size / 1024, 1)}
            for p in paths}


if __name__ == "__main__":
    print(json.dumps(sizes(sys.argv[1:]), indent=1))
