"""Views (pipeline/views.py): the vectorised view function against a per-pixel reference, the parameter
draw's determinism, the 8-byte codec and the settings' checks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import views
from pipeline.errors import DataError


def reference(x, p, partners=None):
    """The module docstring's definition, one row and one pixel at a time (float32 arithmetic)."""
    q = views.decode(p)
    out = []
    for i in range(len(x)):
        m = x[i].astype(np.float32)
        if q["lam"][i]:
            w = np.float32(q["lam"][i]) / np.float32(255)
            m = m * (np.float32(1) - w) + partners[i].astype(np.float32) * w
        if q["flags"][i] & 1:
            m = m[..., ::-1]
        o = np.zeros_like(m)
        dy, dx = int(q["dy"][i]), int(q["dx"][i])
        h, w_ = m.shape[-2:]
        for r in range(h):
            for c in range(w_):
                if 0 <= r - dy < h and 0 <= c - dx < w_:
                    o[..., r, c] = m[..., r - dy, c - dx]
        out.append(o)
    return np.stack(out)


def _params(rng, n, s, flip=True, mix=True):
    q = np.zeros(n, views._DT)
    q["dy"], q["dx"] = rng.integers(-s, s + 1, n), rng.integers(-s, s + 1, n)
    q["flags"] = rng.integers(0, 2, n) if flip else 0
    q["lam"] = rng.integers(0, 128, n) * (rng.random(n) < 0.5) if mix else 0
    q["partner"] = rng.integers(0, n, n)
    return q.view(np.uint8).reshape(n, views.PARAM_BYTES)


@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(5, 6), (1, 4, 4), (3, 7, 9), (2, 3, 5, 4)]),
       s=st.integers(0, 3), dtype=st.sampled_from([np.uint8, np.float32]))
@settings(max_examples=40, deadline=None)
def test_views_equal_the_per_pixel_definition(seed, shape, s, dtype):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (12, *shape)) if dtype == np.uint8 else rng.normal(0, 50, (12, *shape))).astype(dtype)
    p = _params(rng, 12, s)
    partners = x[views.decode(p)["partner"].astype(int)]
    want = reference(x, p, partners)
    assert np.array_equal(views.make(x, p, partners), want)
    assert np.array_equal(views.Maker(x, s, True)(np.arange(12), p), want)  # partners index x itself


def test_channels_never_mix():
    """Channel c holds values 1000 c + pixel: after any flip and shift every non-zero value of output
    channel c is still in [1000 c, 1000 c + 999]."""
    c, h, w = 4, 9, 11
    x = (np.arange(c)[:, None, None] * 1000 + np.arange(h * w).reshape(h, w) % 1000).astype(np.float32)[None]
    x = np.repeat(x, 30, axis=0)
    p = _params(np.random.default_rng(1), 30, 3, mix=False)
    v = views.make(x, p)
    for ch in range(c):
        vals = v[:, ch][v[:, ch] != 0]
        assert vals.size and ((vals >= 1000 * ch) & (vals < 1000 * ch + 1000)).all(), ch


def test_params_are_the_same_for_any_split_of_the_rows():
    spec = views.ViewSpec(count=5, max_shift=2, flip=0.5, mixup=0.5, seed=7)
    whole = views.params(spec, 0, 9000, 9000)
    parts = np.concatenate([views.params(spec, a, b, 9000) for a, b in ((0, 1), (1, 4097), (4097, 8999), (8999, 9000))])
    assert np.array_equal(whole, parts) and whole.shape == (9000 * 5, 8)
    q = views.decode(whole)
    assert (q.reshape(9000, 5)[:, 0] == np.zeros(1, views._DT)).all()  # view 0 is the row itself
    assert np.abs(q["dy"].astype(int)).max() == 2 and (q["lam"] <= 128).all()  # lam/255 <= 0.5 (rounded)
    mixed = q["lam"] > 0
    block = (np.arange(9000 * 5) // 5) // views.BLOCK
    assert (q["partner"][mixed] // views.BLOCK == block[mixed]).all()  # a partner lies in its row's block
    assert 0.4 < mixed.reshape(9000, 5)[:,
                                        1:].mean() < 0.6 and 0.4 < (q["flags"] & 1)[q["lam"] >= 0].mean() * 5 / 4 < 0.6
    other = views.params(views.ViewSpec(count=5, max_shift=2, flip=0.5, mixup=0.5, seed=8), 0, 9000, 9000)
    assert not np.array_equal(whole, other)


def test_spec_round_trip_and_version():
    spec = views.ViewSpec(count=16, max_shift=3, flip=0.25, mixup=0.5, mixup_alpha=0.4, seed=2)
    assert views.spec_of(spec.as_dict(), "c.h5") == spec
    with pytest.raises(DataError, match="view function version 2; this code makes version 1"):
        views.spec_of({**spec.as_dict(), "version": 2}, "c.h5")
    with pytest.raises(DataError, match="cannot re-make"):
        views.spec_of({**spec.as_dict(), "rotate": 1}, "c.h5")


@pytest.mark.parametrize("kw, message", [(dict(count=0), "count"), (dict(flip=1.5), "flip"),
                                         (dict(mixup=-0.1), "mixup"), (dict(mixup_alpha=0), "mixup_alpha"),
                                         (dict(max_shift=200), "max_shift")])
def test_bad_specs(kw, message):
    with pytest.raises(ValueError, match=message):
        views.ViewSpec(**kw)


def test_shape_checks():
    views.ViewSpec(count=4, max_shift=2).check_shape((1, 28, 28))
    with pytest.raises(ValueError, match="need image rows"):
        views.ViewSpec(count=4, max_shift=2).check_shape((784,))
    with pytest.raises(ValueError, match="does not fit"):
        views.ViewSpec(count=4, max_shift=5).check_shape((3, 4, 4))
    with pytest.raises(ValueError, match="shifts further"):
        views.Maker(np.zeros((2, 6, 6), np.uint8), 1, False)(np.arange(2), _params(np.random.default_rng(0), 2, 3))


def test_fewer_views_are_a_prefix_of_more():
    """View j does not depend on K: the first 4 views of a 16-view draw are the 4-view draw."""
    kw = dict(max_shift=2, flip=0.5, mixup=0.5, seed=3)
    many = views.params(views.ViewSpec(count=16, **kw), 0, 5000, 5000).reshape(5000, 16, 8)
    few = views.params(views.ViewSpec(count=4, **kw), 0, 5000, 5000).reshape(5000, 4, 8)
    assert np.array_equal(many[:, :4], few)
