"""Pilot of a class-prior tail for top-k caches (before it was built into the cache stage).

The prior: for each class c, the mean over a seeded sample of transfer rows whose top class is c of the
members' log-probabilities at T = 1, pi[c] (C x C).  A top-k row with top class c rebuilds each member's tail
logits as ``pi[c, j] + s_m - LSE_{j in R} pi[c, j]``: the tail's log-sum-exp at T = 1 exact, shared within
the tail as the prior says.  Prints the mean total variation from the full targets of the spread rule and of
the prior rule, and writes a pilot cache (a copy of the full cache whose float32 logits give the prior rule's
targets at T exactly; resealed) for students at that T.

Usage: python prior-pilot2.py FULL_CACHE K T SAMPLE_ROWS OUT
"""
import math
import shutil
import sys

import h5py
import numpy as np

from pipeline import soft, topk
from pipeline.formats import h5seal
from pipeline.formats.cache import open_cache

src, k, T, sample, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
v = open_cache(src).logits().astype(np.float64)
n, M, C = v.shape
ids, kept, tail = topk.compress(v, k)
d = topk.tail_spread(v, ids, tail).astype(np.float64)
ls = v - v.max(2, keepdims=True)
ls -= np.log(np.exp(ls).sum(2, keepdims=True))
top = ids[:, 0].astype(np.int64)
pick = np.sort(np.random.default_rng(0).choice(n, size=min(sample, n), replace=False))
cnt = np.bincount(top[pick], minlength=C)
prior = np.zeros((C, C))
np.add.at(prior, top[pick], ls[pick].mean(1))
prior /= np.maximum(cnt, 1)[:, None]  # a class no sampled row tops: zeros, the even share
rest = np.ones((n, C), bool)
np.put_along_axis(rest, ids.astype(np.int64), False, 1)
pr = np.where(rest, prior[top], -np.inf)
mx = pr.max(1, keepdims=True)
lse = mx[:, 0] + np.log(np.exp(pr - mx).sum(1))
logits = np.where(rest[:, None, :], prior[top][:, None, :] + (tail - lse[:, None])[..., None], 0.0)
np.put_along_axis(logits, np.broadcast_to(ids.astype(np.int64)[:, None, :], kept.shape), kept.astype(np.float64), 2)
full = soft.combine_soft_targets(v, T).astype(np.float64)
tv = lambda p: 0.5 * np.abs(p - full).sum(1)  # noqa: E731
sp = topk.rebuild(ids, kept, tail, C, T, spread=d).astype(np.float64)
pp = soft.combine_soft_targets(logits, T).astype(np.float64)
print(f"k={k} T={T:g} prior from {len(pick)} rows ({(cnt > 0).sum()} of {C} classes seen): mean TV from full: "
      f"spread rule {tv(sp).mean():.4f}, prior rule {tv(pp).mean():.4f}; max {tv(sp).max():.3f} / {tv(pp).max():.3f}")
# softmax(z_m / T) must be member m's rebuilt distribution at T: z_m = T * log q_m(T)
z = T * np.log(np.maximum(soft.tempered_softmax(logits, T).astype(np.float64), 1e-300))
shutil.copy(src, out)
with h5py.File(out, "r+") as f:
    f["logits"][...] = z.astype(np.float32)
    f.attrs["pilot"] = f"class-prior tail of top {k} at T={T:g} ({len(pick)} sample rows); other T are not the rule's"
    h5seal.seal(f)
print("pilot cache ->", out)
