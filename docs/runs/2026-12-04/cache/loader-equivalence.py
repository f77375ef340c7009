"""Batches of an older TransferLoader (streaming) against this tree's, bit for bit, 2 budgets x 2 targets, 430 batches each.

Usage (from the repository root): python loader-equivalence.py CACHE PREPARED OLD_LOADER_PY"""
import importlib.util, sys
import numpy as np, torch
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.student.loader import TransferLoader as New
spec = importlib.util.spec_from_file_location("old_loader", sys.argv[3])  # the loader before, e.g. from `git show`
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
cache, prep = sys.argv[1], sys.argv[2]
c, p = open_cache(cache), open_prepared(prep)
for target in ("soft", "none"):
    for budget in (16.0, 3.0):
        a = old.TransferLoader(c, p, target, 4.0, budget_mib=budget)
        b = New(c, p, target, 4.0, budget_mib=budget)
        assert not a.resident and not b.resident
        n = 0
        for ba, bb in zip(a.epoch(torch.Generator().manual_seed(3), 128), b.epoch(torch.Generator().manual_seed(3), 128)):
            for u, v in zip(ba, bb):
                assert torch.equal(u, v), (target, budget, n)
            n += 1
        print(target, budget, n, "batches identical; peak rows", a.peak_buffer_rows, b.peak_buffer_rows)
