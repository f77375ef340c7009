"""Cache stage, pure pieces: block diagnostics (against a hand-computed example and a naive
re-implementation, tests/oracles.py), block and shard arithmetic, padding, the pipeline."""
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import soft as sm
from pipeline.errors import UsageError
from pipeline.soft import DiagnosticSums
from stages.cache.settings import CacheConfig, parse_shard
from stages.cache.stream import StreamStats, blocks, part_path, resolve_shard, run_pipeline, shard_rows
from stages.cache.teachers import pad_rows
from tests import oracles


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), members=st.integers(1, 4), block=st.integers(1, 128), seed=st.integers(0, 2**31),
       T=st.sampled_from([0.5, 1.0, 4.0, 20.0]), unlabelled=st.floats(0, 1))
def test_block_diagnostics_equal_whole_array(n, members, block, seed, T, unlabelled):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, members, 7)).astype(np.float32)
    labels = np.where(rng.random(n) < unlabelled, -1, rng.integers(0, 7, n))
    soft = sm.combine_soft_targets(logits, T)
    whole = sm.diagnostics(logits, soft, labels, T)
    sums = DiagnosticSums()
    for lo, hi in blocks(0, n, block):
        sums.add(logits[lo:hi], soft[lo:hi], labels[lo:hi])
    got = sums.result()
    for k, v in whole.items():  # same formulas, only the float64 summation order differs
        assert (np.isnan(v) and np.isnan(got[k])) or abs(got[k] - v) <= 1e-12, k


# Five rows, three classes, two members, worked by hand (the stage's formulas are not consulted):
#   soft row             label  argmax  confidence, ECE bin (k/15, (k+1)/15]   H(p) = -sum p ln p
#   .70 .20 .10            0     0 ok    .70 -> bin 10 (.667, .733]             0.801818552543
#   .71 .19 .10            1     0       .71 -> bin 10                          0.788965557948
#   .20 .75 .05            0     1       .75 -> bin 11 (.733, .800]             0.687435750503
#   .05 .10 .85            2     2 ok    .85 -> bin 12 (.800, .867]             0.518186213050
#   .50 .40 .10           -1     0       (unlabelled: entropy and disagreement only)  0.943348392329
# accuracy 2/4; ECE = (|1 + 0 - .70 - .71| + |0 - .75| + |1 - .85|) / 4 = (.41 + .75 + .15) / 4 = .3275
# (bin 10 holds two rows: per-bin sums, not per-row |errors|, which would give (.30 + .71 + .75 + .15) / 4);
# member 0 agrees with argmax p on every row, member 1 differs on rows 1 and 3: 2 / (5 x 2) = 0.2.
HAND_SOFT = np.array([[.70, .20, .10], [.71, .19, .10], [.20, .75, .05], [.05, .10, .85], [.50, .40, .10]])
HAND_LABELS = np.array([0, 1, 0, 2, -1])
HAND_LOGITS = np.zeros((5, 2, 3), np.float32)
for _r, (_m0, _m1) in enumerate([(0, 0), (0, 1), (1, 1), (2, 0), (0, 0)]):
    HAND_LOGITS[_r, 0, _m0] = HAND_LOGITS[_r, 1, _m1] = 2.0
HAND = {"mean_entropy_nats": (0.8018185525433372 + 0.788965557947729 + 0.6874357505033553 + 0.5181862130502128
                              + 0.9433483923290391) / 5,
        "teacher_accuracy": 0.5, "member_disagreement": 0.2, "ece": 0.3275}


@pytest.mark.parametrize("block", [5, 2, 1])  # whole array, and streamed in blocks
def test_diagnostics_hand_computed(block):
    sums = DiagnosticSums()
    for lo, hi in blocks(0, 5, block):
        sums.add(HAND_LOGITS[lo:hi], HAND_SOFT[lo:hi], HAND_LABELS[lo:hi])
    for got in (sums.result(), sm.diagnostics(HAND_LOGITS, HAND_SOFT, HAND_LABELS, 1.0)):
        for k, v in HAND.items():  # float64 sums of five terms: 1e-12 is rounding
            assert got[k] == pytest.approx(v, abs=1e-12), k


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), members=st.integers(1, 3), seed=st.integers(0, 2**31), T=st.sampled_from([0.5, 1.0, 4.0]),
       unlabelled=st.floats(0, 1))
def test_soft_targets_and_diagnostics_match_a_naive_reimplementation(n, members, seed, T, unlabelled):
    """pipeline.soft against tests/oracles.py (loops and the math module, written from docs/design.md)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, members, 5)).astype(np.float32)
    labels = np.where(rng.random(n) < unlabelled, -1, rng.integers(0, 5, n))
    for combine in sm.COMBINES:
        # float32 result of a float64 computation: half an ulp of numbers <= 1 is 6e-8
        np.testing.assert_allclose(sm.combine_soft_targets(logits, T, combine), oracles.soft_targets(logits, T,
                                                                                                     combine),
                                   rtol=0, atol=1e-7, err_msg=combine)
    soft = sm.combine_soft_targets(logits, T)
    got, want = sm.diagnostics(logits, soft, labels, T), oracles.diagnostics(logits, soft, labels)
    for k, v in want.items():
        assert (np.isnan(v) and np.isnan(got[k])) or got[k] == pytest.approx(v, abs=1e-12), k


@given(lo=st.integers(0, 1000), span=st.integers(0, 1000), block=st.integers(1, 97))
def test_blocks_cover_the_range_at_absolute_multiples(lo, span, block):
    out = blocks(lo, lo + span, block)
    assert sum(b - a for a, b in out) == span
    assert all(b == c for (_, b), (c, _) in zip(out, out[1:]))
    assert all(a % block == 0 for a, _ in out[1:]) and all(b - a <= block for a, b in out)


@given(rows=st.integers(1, 5000), batch=st.integers(1, 600), count=st.integers(1, 8))
def test_shards_cover_rows_once_on_batch_boundaries(rows, batch, count):
    ranges = [shard_rows(rows, batch, i, count) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % batch == 0 or lo == rows for lo, _ in ranges)


def test_shard_from_option_or_torchrun_env():
    assert resolve_shard("", {}) == (0, 1)
    assert resolve_shard("", {"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    assert resolve_shard("1/4", {"RANK": "2", "WORLD_SIZE": "3"}) == (1, 4)  # the option wins
    for bad in ("3/3", "-1/2", "a/b", "1", "1/0"):
        with pytest.raises(UsageError, match="shard must be i/n"):
            parse_shard(bad)
    with pytest.raises(UsageError):
        CacheConfig(shard="2/2")
    assert part_path(__import__("pathlib").Path("d/c.h5"), 1, 3).name == "c.part1of3.h5"


def test_pad_rows():
    x = np.ones((3, 2, 2), np.float64)
    p = pad_rows(x, 5)
    assert p.dtype == np.float32 and p.shape == (5, 2, 2) and p.flags.c_contiguous
    assert p[:3].sum() == 12 and not p[3:].any()
    with pytest.raises(ValueError):
        pad_rows(x, 2)


def _batches(n, b):
    return [(lo, min(n, lo + b)) for lo in range(0, n, b)]


def test_pipeline_writes_every_batch_in_order():
    seen, stats = [], StreamStats()
    run_pipeline(_batches(103, 10), lambda a, b: (np.arange(a, b), None), lambda x, lo: x * 2,
                 lambda lo, hi, out, y: seen.append((lo, hi, out.tolist())), stats, depth=2)
    assert [s[:2] for s in seen] == _batches(103, 10) and stats.batches == 11
    assert all(out == [2 * r for r in range(lo, hi)] for lo, hi, out in seen)


@pytest.mark.parametrize("where", ["read", "infer", "write"])
def test_pipeline_error_in_any_thread_stops_all(where):
    def boom(stage, lo):
        if stage == where and lo >= 30:
            raise RuntimeError(f"{stage} failed at {lo}")

    written = []

    def read(a, b):
        boom("read", a)
        return np.zeros(b - a), None

    def infer(x, lo):
        boom("infer", lo)
        return x

    def write(lo, hi, out, y):
        boom("write", lo)
        written.append(lo)

    before = threading.active_count()
    with pytest.raises(RuntimeError, match=f"{where} failed at 30"):
        run_pipeline(_batches(1000, 10), read, infer, write, StreamStats())
    assert threading.active_count() == before  # no thread left behind
    assert written == sorted(written) and all(lo < 30 for lo in written)  # nothing at or after the failure
