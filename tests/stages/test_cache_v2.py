"""kd-cache/2 layouts (docs/formats.md, "kd-cache"): what the compact and the top-k cache store and cost, the
one derivation of targets, verify's checks of a top-k cache (each able to fail), and the refusals."""
import json
import shutil

import h5py
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline import soft, topk
from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats import h5seal
from pipeline.formats.cache import CacheLayout, label_dtype, open_cache
from pipeline.formats.prepared import open_prepared
from stages.cache import AddTemperatureConfig, CacheConfig, VerifyConfig, add_temperature, cache_soft_targets, verify
from stages.student.loader import TransferLoader
from tests import oracles
from tests.cache_helpers import targets

QUIET = dict(log=lambda m: None)
CPU = dict(device="cpu", threads=1, batch_size=256, temperatures=(1.0, 4.0, 20.0))


@pytest.fixture(scope="module")
def caches(tiny_teacher, tiny_prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("v2")
    build = lambda name, **kw: cache_soft_targets(CacheConfig(**CPU, **kw), [tiny_teacher], tiny_prepared,  # noqa: E731
                                                  d / f"{name}.h5", **QUIET)
    return {"compact": build("compact"), "full32": build("full32", logits_dtype="float32", store_soft=True),
            "top3": build("top3", top_k=3)}


def test_the_compact_layout_is_the_default(caches, tiny_prepared):
    c = open_cache(caches["compact"])
    info = open_prepared(tiny_prepared)
    with h5py.File(caches["compact"]) as f:
        assert sorted(k for k in f if k != "diagnostics") == ["labels", "logits"]  # no stored targets
        assert f["logits"].dtype == np.float16 and f["labels"].dtype == np.int8
    assert (c.version, c.layout.layout, c.soft_temperatures, c.temperatures) == (2, "full", (), (1.0, 4.0, 20.0))
    assert np.array_equal(c.labels(), info.load("train")[1])
    for T in (1.0, 2.5, 20.0):  # any T, derived from the stored float16 logits (oracles: no shared code)
        np.testing.assert_allclose(targets(c, T), oracles.soft_targets(c.read("logits"), T), rtol=0, atol=1e-7)
    # bytes: 2 members x 10 classes x 2 + a 1-byte label a row, in chunks that leave little spare
    assert c.layout.bytes_per_row() == 41
    size = caches["compact"].stat().st_size
    assert c.layout.size()[0] >= size >= 41 * c.rows


def test_full32_with_stored_targets_is_version_1_content(caches):
    a, b = open_cache(caches["full32"]), open_cache(caches["compact"])
    assert a.soft_temperatures == (1.0, 4.0, 20.0) and a.logits().dtype == np.float32
    for T in a.soft_temperatures:  # stored from the stored logits by the one function
        np.testing.assert_array_equal(a.stored_soft(T), soft.targets(a.stored(), T))
        np.testing.assert_allclose(targets(b, T), a.stored_soft(T), atol=2e-3)  # float16 logits' rounding only
    assert a.layout.bytes_per_row() == 2 * 10 * 4 + 3 * 10 * 4 + 1


def test_top_k_layout_rebuild_and_bound(caches, tiny_teacher, tiny_prepared):
    c, full = open_cache(caches["top3"]), open_cache(caches["full32"])
    with h5py.File(caches["top3"]) as f:
        names = ("topk/ids", "topk/logits", "topk/tail", "topk/spread")
        assert {k: (f[k].shape, f[k].dtype) for k in names} == {
            "topk/ids": ((c.rows, 3), np.uint8), "topk/logits": ((c.rows, 2, 3), np.float16),
            "topk/tail": ((c.rows, 2), np.float16), "topk/spread": ((c.rows,), np.float16)} and "logits" not in f
        assert f.attrs["tail_rule"] == "spread"
    assert c.layout.bytes_per_row() == 3 + 2 * 3 * 2 + 2 * 2 + 2 + 1
    s = c.stored()
    assert s.spread is not None and np.all(s.spread >= 0)
    for T in (1.0, 4.0, 20.0):
        tv = 0.5 * np.abs(targets(c, T).astype(np.float64) - full.stored_soft(T)).sum(1)
        eps = topk.bound(s.kept, s.tail, 10, T)
        # float16 of values below 8: tail logits move by the tail's rounding and the spread's
        assert np.all(tv <= eps + topk.rounding_slack(2 * 2 ** -8 * 8, T) + 1e-6)
    r = verify(VerifyConfig(sample_rows=256), caches["top3"], [tiny_teacher], tiny_prepared, **QUIET)
    assert r["top_k"] == 3 and r["not_a_top_k"] == 0 and r["min_bound_margin"] > 0
    assert r["max_tv_from_full"] <= r["max_bound"] and r["max_abs_logit_diff"] == 0.0
    with pytest.raises(UsageError, match="a top-k cache keeps"):
        c.logits()


def test_a_top_k_cache_from_before_the_spread_is_read_with_the_even_rule(caches, tiny_teacher, tiny_prepared,
                                                                         tmp_path):
    def older(f):  # what the writer made before the spread was stored
        del f["topk/spread"]
        f.attrs["tail_rule"] = "even"
    old = open_cache(_tampered(caches["top3"], tmp_path / "old.h5", older))
    s, new = old.stored(), open_cache(caches["top3"]).stored()
    assert s.spread is None and old.layout.bytes_per_row() == 3 + 2 * 3 * 2 + 2 * 2 + 1
    np.testing.assert_array_equal(soft.targets(s, 4.0), topk.rebuild(s.ids, s.kept, s.tail, 10, 4.0))
    np.testing.assert_array_equal(soft.targets(s, 1.0), soft.targets(new, 1.0))  # the rules agree at T = 1
    assert verify(VerifyConfig(sample_rows=256), old.path, [tiny_teacher], tiny_prepared, **QUIET)["top_k"] == 3


def _tampered(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
        h5seal.seal(f)  # consistent: only re-running the teacher can tell
    return dst


@pytest.mark.parametrize("edit, problem", [
    (lambda f: f["topk/logits"].__setitem__((slice(0, 64), 0, 0), f["topk/logits"][:64, 0, 0] + 0.25),
     "max \\|logit diff\\| 0.25"),
    (lambda f: f["topk/tail"].__setitem__((slice(0, 64), 1), f["topk/tail"][:64, 1] - 3), "max \\|logit diff\\| 3"),
    (lambda f: f["topk/spread"].__setitem__(slice(0, 64), f["topk/spread"][:64] + 2), "max \\|logit diff\\| 2"),
    # a kept class swapped for the least likely one: the rest is no longer below the kept classes
    (lambda f: f["topk/ids"].__setitem__((slice(None), 2), 9 - f["topk/ids"][:, 0]), "rows not a top 3"),
])
def test_verify_catches_a_top_k_cache_that_is_not_the_teachers(caches, tiny_teacher, tiny_prepared, tmp_path, edit,
                                                               problem):
    bad = _tampered(caches["top3"], tmp_path / "bad.h5", edit)
    with pytest.raises(IntegrityError, match=problem):
        verify(VerifyConfig(sample_rows=1200, windows=1), bad, [tiny_teacher], tiny_prepared, **QUIET)


def test_loader_derives_top_k_targets_per_batch(caches, tiny_prepared):
    c, info = open_cache(caches["top3"]), open_prepared(tiny_prepared)
    want = targets(c, 4.0)
    for budget in (1024.0, 0.5):  # resident, streamed
        loader = TransferLoader(c, info, "soft", 4.0, budget_mib=budget, block_rows=100)
        x_all = {r.tobytes(): i for i, r in enumerate(info.load("train")[0])}
        for x, t, _ in loader.epoch(torch.Generator().manual_seed(0), 64):
            rows = [x_all[r.tobytes()] for r in x.numpy()]
            assert np.array_equal(t.numpy(), want[rows])


def test_add_temperature_on_top_k_records_and_refuses_new_weights(caches, tmp_path):
    out = add_temperature(AddTemperatureConfig(temperatures=(2.0,)), caches["top3"], tmp_path / "c.h5", **QUIET)
    c = open_cache(out)
    assert c.temperatures == (1.0, 4.0, 20.0, 2.0) and c.soft_temperatures == () and 2.0 in c.diagnostics()
    with pytest.raises(UsageError, match="a top-k cache keeps the classes its own member weights ranked"):
        add_temperature(AddTemperatureConfig(member_weights=(3.0, 1.0)), caches["top3"], tmp_path / "w.h5", **QUIET)


def test_top_k_of_every_class_is_refused(tiny_teacher, tiny_prepared, tmp_path):
    with pytest.raises(UsageError, match="top_k 10: keep fewer than the 10 classes"):
        cache_soft_targets(CacheConfig(**CPU, top_k=10), [tiny_teacher], tiny_prepared, tmp_path / "c.h5", **QUIET)
    assert not list(tmp_path.iterdir())


def test_logits_beyond_float16_name_the_fix(tiny_prepared, tmp_path):
    """A teacher whose logits reach 1e6 cannot be stored in float16: one line naming --logits-dtype float32."""
    w = numpy_helper.from_array(np.full((784, 10), 1e4, np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["out"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 28, 28])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "big.onnx"))
    with pytest.raises(DataError, match="exceed the range of float16.*--logits-dtype float32"):
        cache_soft_targets(CacheConfig(**CPU, gate=False), [tmp_path / "big.onnx"], tiny_prepared, tmp_path / "c.h5",
                           **QUIET)
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()
    cache_soft_targets(CacheConfig(**CPU, gate=False, logits_dtype="float32"), [tmp_path / "big.onnx"], tiny_prepared,
                       tmp_path / "c.h5", **QUIET)


def test_labels_take_the_smallest_signed_type_and_views_share_theirs():
    assert [label_dtype(c) for c in (2, 128, 129, 32768, 40000)] == [np.int8, np.int8, np.int16, np.int16, np.int32]
    lay = CacheLayout(rows=40, members=3, classes=10, k=4, views=True, first_row=6)  # a part: rows [6, 46) of K=4
    assert lay.label_rows == 11 and lay.label_span(0, 2) == (0, 1) and lay.label_span(2, 3) == (1, 2)
    # 3 members x 10 classes x 2 bytes + 8 bytes of view parameters + a 1-byte label shared by 4 views
    assert lay.bytes_per_row() == 68.25
    one = json.loads(json.dumps(CacheLayout(1000, 3, 1000, top_k=10, k=64, views=True).bytes_per_row()))
    assert one == 10 * 2 + 3 * 10 * 2 + 3 * 2 + 2 + 8 + 2 / 64  # ids uint16, tails, the spread, labels int16


def test_merged_top_k_shards_keep_the_spread_and_refuse_parts_of_another_rule(caches, tiny_teacher, tiny_prepared,
                                                                             tmp_path):
    from stages.cache import MergeConfig, merge

    parts = [cache_soft_targets(CacheConfig(**CPU, top_k=3, shard=f"{i}/2"), [tiny_teacher], tiny_prepared,
                                tmp_path / "s.h5", **QUIET) for i in range(2)]
    merged = open_cache(merge(MergeConfig(), parts, tmp_path / "m.h5", **QUIET))
    whole = open_cache(caches["top3"])
    assert merged.layout.tail_spread and merged.attrs["tail_rule"] == "spread"
    for name in ("topk/ids", "topk/logits", "topk/tail", "topk/spread"):
        assert np.array_equal(merged.read(name), whole.read(name)), name

    def older(f):
        del f["topk/spread"]
        f.attrs["tail_rule"] = "even"
    mixed = [parts[0], _tampered(parts[1], tmp_path / "old-part.h5", older)]
    with pytest.raises(IntegrityError, match="tail_rule"):
        merge(MergeConfig(), mixed, tmp_path / "m2.h5", **QUIET)


def test_bucket_targets_mark_exactly_the_tail_classes(caches, tiny_prepared):
    from stages.student.batches import batch_targets, split_tail

    info = open_prepared(tiny_prepared)
    c = open_cache(caches["top3"])
    s = c.stored(0, 64)
    p, tail = split_tail(batch_targets(s, "bucket", 4.0, 64, 10))
    want = np.ones((64, 10), bool)
    np.put_along_axis(want, s.ids.astype(np.int64), False, 1)
    assert np.array_equal(tail.numpy(), want)
    np.testing.assert_array_equal(p.numpy(), soft.targets(s, 4.0))
    g = torch.Generator().manual_seed(0)
    x, t, y = next(TransferLoader(c, info, "bucket", 4.0).epoch(g, 32))
    assert torch.signbit(t).sum(1).tolist() == [7] * 32  # 10 classes, 3 kept
    full = open_cache(caches["compact"]).stored(0, 64)  # a cache that keeps every class: no tail, plain targets
    np.testing.assert_array_equal(batch_targets(full, "bucket", 4.0, 64, 10).numpy(), soft.targets(full, 4.0))


def test_a_prior_rule_cache_stores_its_prior_verifies_and_merges(caches, tiny_teacher, tiny_prepared, tmp_path):
    from stages.cache import MergeConfig, merge

    def build(path, **kw):
        return cache_soft_targets(CacheConfig(**CPU, top_k=3, tail_prior_rows=400, **kw), [tiny_teacher],
                                  tiny_prepared, path, **QUIET)
    c = open_cache(build(tmp_path / "p.h5"))
    prior = c.prior()
    assert c.layout.tail_rule == "prior" and c.attrs["tail_rule"] == "prior" and prior.shape == (10, 10)
    assert prior.dtype == np.float16 and np.all(prior <= 0) and c.layout.size()[0] >= 10 * 10 * 2
    assert c.identity["settings"]["tail_prior_rows"] == 400
    s, spread = c.stored(), open_cache(caches["top3"]).stored()
    np.testing.assert_array_equal(s.ids, spread.ids)  # the same rows as the spread rule's cache...
    want = topk.rebuild(s.ids, s.kept, s.tail, 10, 4.0, prior=prior)
    np.testing.assert_array_equal(soft.targets(s, 4.0), want)  # ...rebuilt with the prior
    assert not np.array_equal(want, soft.targets(spread, 4.0))
    r = verify(VerifyConfig(sample_rows=256), c.path, [tiny_teacher], tiny_prepared, **QUIET)
    assert r["tail_rule"] == "prior" and r["prior_gap"] == 0 and r["min_bound_margin"] > 0

    def shifted(f):  # another prior, resealed: the file reads, verify re-derives the prior and refuses it
        f["topk/prior"][...] = f["topk/prior"][...] - 0.5
        h5seal.seal(f)
    with pytest.raises(IntegrityError, match="class prior"):
        verify(VerifyConfig(sample_rows=256), _tampered(c.path, tmp_path / "t.h5", shifted), [tiny_teacher],
               tiny_prepared, **QUIET)
    parts = [build(tmp_path / "s.h5", shard=f"{i}/2") for i in range(2)]
    merged = open_cache(merge(MergeConfig(), parts, tmp_path / "m.h5", **QUIET))
    assert merged.layout.tail_rule == "prior"
    np.testing.assert_array_equal(merged.prior(), prior)
    for name in ("topk/ids", "topk/logits", "topk/tail", "topk/spread"):
        assert np.array_equal(merged.read(name), c.read(name)), name
    with pytest.raises(IntegrityError, match="class prior"):
        merge(MergeConfig(), [parts[0], _tampered(parts[1], tmp_path / "o.h5", shifted)], tmp_path / "m2.h5", **QUIET)
    with pytest.raises(UsageError, match="needs --top-k"):
        CacheConfig(tail_prior_rows=10)
    stored = open_cache(build(tmp_path / "st.h5", store_soft=True))  # stored targets from the stored prior
    np.testing.assert_array_equal(stored.stored_soft(4.0), soft.targets(stored.stored(), 4.0, use_stored=False))
    assert verify(VerifyConfig(sample_rows=256), stored.path, [tiny_teacher], tiny_prepared, **QUIET)["prior_gap"] == 0
