"""Re-key teacher member checkpoints trained by commit 8877b38, where the translation setting was named
`shift`; it is `max_shift` since the house-in-order rename (same meaning, same code path). Only the reuse
key's setting name changes: weights, arch, norm and provenance are copied unchanged, and the script
refuses any other difference between the old key and the key the current code computes."""
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.formats.checkpoint import read_checkpoint, write_checkpoint

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
ck = read_checkpoint(src, role="teacher-member")
key = ck.meta["key"]
settings = dict(key["settings"])
assert "shift" in settings and "max_shift" not in settings, settings
settings["max_shift"] = settings.pop("shift")
new_meta = {**ck.meta, "key": {**key, "settings": settings},
            "migrated": "setting shift renamed max_shift (docs/runs/2026-12-03/teacher/migrate_members.py)"}
write_checkpoint(dst, replace(ck, meta=new_meta))
print(f"{src} -> {dst}: {sorted(settings)}")
