"""Teacher input contracts, pure parts: the --teacher syntax, the metadata JSON, the adapter against
inputs prepared by hand, and the weighted combination of members against hand-computed examples."""
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import contract as ct
from pipeline import soft
from pipeline.errors import DataError, UsageError
from pipeline.formats.onnx_model import InputContract
from tests.foreign import by_hand


# ------------------------------------------------------------------------------------- --teacher
@pytest.mark.parametrize("text, path, declared", [
    ("t.onnx", "t.onnx", {}),
    ("dir/t.onnx:input=unit,layout=flat", "dir/t.onnx", {"range": "unit", "layout": "flat"}),
    ("a:b/t.onnx", "a:b/t.onnx", {}),  # a colon in the path, no declaration after it
    ("a:b/t.onnx:output=probabilities", "a:b/t.onnx", {"output": "probabilities"}),
    ("odd:input=x.onnx:", "odd:input=x.onnx", {}),  # a trailing ':' ends any path
    ("t.onnx:input=normalised,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nhwc", "t.onnx",
     {"range": "normalised", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "nhwc"}),
    ("t.onnx:dtype=uint8", "t.onnx", {"dtype": "uint8"}),
    # quoted values: tf2onnx's output names, and paths with colons that stay paths
    ('m.onnx:output="Identity:0"', "m.onnx", {"output": "Identity:0"}),
    ('a:b/m.onnx:output="dense/BiasAdd:0",input=unit', "a:b/m.onnx", {"range": "unit", "output": "dense/BiasAdd:0"}),
    ('m.onnx:output="a,b=c"', "m.onnx", {"output": "a,b=c"}),
    ('m.onnx:output="say ""hi"":0"', "m.onnx", {"output": 'say "hi":0'}),
    ('m.onnx:output="a"",b",input=unit', "m.onnx", {"range": "unit", "output": 'a",b'}),
    ('my"dir:m.onnx', 'my"dir:m.onnx', {}),  # a quote not after '=' is a plain character of a path
    ('a="b:c.onnx', 'a="b:c.onnx', {}),  # nor does an unclosed one that follows no key make a declaration
    ("t.onnx:tta=hflip", "t.onnx", {"tta": "hflip"}),
    ("t.onnx:tta=none,input=unit", "t.onnx", {"range": "unit", "tta": "none"}),
])
def test_teacher_syntax(text, path, declared):
    spec = ct.parse_teacher(text)
    assert spec.path == Path(path) and spec.declared.as_dict() == declared
    assert ct.parse_teacher(Path(text)).path == Path(text)  # a Path is never split
    if declared:
        assert ct.parse_teacher(f"{path}:{spec.declared.spec()}") == spec  # spec() is the syntax back


@pytest.mark.parametrize("text, fragment", [
    ("t.onnx:colour=rgb", "unknown key 'colour'"),
    ("t.onnx:input=percent", "range must be one of raw, unit, normalised"),
    ("t.onnx:layout=chw", "layout must be one of"),
    ("t.onnx:input=unit,mean=0.5", "mean and std go with range normalised"),
    ("t.onnx:dtype=uint8,input=unit", "a uint8 input takes raw pixels"),
    ("t.onnx:input=normalised,std=0", "std must be > 0"),
    ("t.onnx:input=normalised,mean=a/b", "mean must be a number"),
    ("t.onnx:input=unit,input=raw", "input given twice"),
    ('m.onnx:output="Identity:0', "has no closing"),
    ('m.onnx:output="a"b"', "bad quoted value"),
    ("t.onnx:tta=vflip", "tta must be one of none, hflip"),
])
def test_bad_declarations_are_usage_errors(text, fragment):
    with pytest.raises(UsageError, match=fragment) as e:
        ct.parse_teacher(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["logits", "Identity:0", "dense/BiasAdd:0", "a,b", 'q"uote', "x=y", "two words",
                                  'a",b:0'])
def test_spec_quotes_what_the_parser_needs_quoted(name):
    c = InputContract(range="unit", output=name)
    assert ct.parse_teacher(f"dir:x/m.onnx:{c.spec()}") == ct.TeacherSpec(Path("dir:x/m.onnx"), c)
    assert (c.spec() == f"input=unit,output={name}") == (name == "logits")  # quoted unless plain


def test_command_line_wins_field_by_field_and_a_range_drops_the_statistics():
    meta = InputContract(range="normalised", mean=(0.5, 0.4, 0.3), std=0.2, layout="nhwc", output="p")
    merged, own = ct.merge(InputContract(range="unit"), meta)
    assert merged == InputContract(range="unit", layout="nhwc", output="p") and own == ((0.5, 0.4, 0.3), 0.2)
    assert ct.merge(InputContract(), meta) == (meta, ((0.5, 0.4, 0.3), 0.2))
    assert InputContract.from_dict(meta.as_dict()) == meta
    with pytest.raises(ValueError, match="unknown field"):
        InputContract.from_dict({"range": "unit", "scale": 255})


# ------------------------------------------------------------------------------------- the adapter
GREY = ct.Geometry((6, 5), "uint8", 255.0, 0.3, 0.25)
CHANNEL = ct.Geometry((1, 6, 5), "uint8", 255.0, 0.3, 0.25)
COLOUR = ct.Geometry((3, 6, 5), "uint8", 255.0, (0.2, 0.4, 0.6), (0.1, 0.2, 0.3))  # per-channel, as prepare may write


@pytest.mark.parametrize("geom", [GREY, CHANNEL, COLOUR], ids=["hw", "1hw", "3hw"])
@pytest.mark.parametrize("layout", ["same", "nchw", "nhwc", "flat", "flat-nhwc"])
@pytest.mark.parametrize("range_", ["raw", "unit", "normalised", "own"])
def test_adapter_equals_inputs_prepared_by_hand(geom, layout, range_):
    x = np.random.default_rng(0).integers(0, 256, (7, *geom.shape)).astype(np.uint8)
    own = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if geom.channels == 3 else (0.1, 0.5)
    mean, std = own if range_ == "own" else (geom.mean, geom.std)
    c = InputContract(range="normalised" if range_ == "own" else range_, layout=layout,
                      **({"mean": own[0], "std": own[1]} if range_ == "own" else {}), dtype="float32")
    got = ct.adapt(x, c, geom)
    ref = by_hand(x, c.range, layout, mean=mean, std=std)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (7, *geom.fits()[geom.canonical(layout)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_default_contract_gives_prepared_normalise_bytes(tiny_prepared):
    from pipeline.formats.prepared import open_prepared

    info = open_prepared(tiny_prepared)
    x, _ = info.load_raw("train", 0, 300)
    c = InputContract(range="normalised", layout="same", dtype="float32")
    assert ct.adapt(x, c, ct.Geometry.of(info)).tobytes() == info.normalise(x).tobytes()
    explicit = InputContract(range="normalised", layout="same", mean=info.mean, std=info.std, dtype="float32")
    assert ct.adapt(x, explicit, ct.Geometry.of(info)).tobytes() == info.normalise(x).tobytes()


@pytest.mark.parametrize("geom", [GREY, CHANNEL, COLOUR], ids=["hw", "1hw", "3hw"])
@pytest.mark.parametrize("layout", ["same", "nhwc", "flat"])
def test_hflip_views_are_the_mirror_before_the_layout(geom, layout):
    x = np.random.default_rng(1).integers(0, 256, (4, *geom.shape)).astype(np.uint8)
    c = InputContract(range="unit", layout=layout, dtype="float32", tta="hflip")
    plain, mirror = ct.views_of(x, c, geom)
    np.testing.assert_array_equal(plain, ct.adapt(x, c, geom))
    flipped = np.stack([np.stack([row[..., ::-1] for row in img]) if img.ndim == 3 else img[:, ::-1] for img in x])
    np.testing.assert_allclose(mirror, by_hand(flipped, "unit", layout), rtol=1e-6)
    assert len(ct.views_of(x, InputContract(range="unit", layout=layout, dtype="float32"), geom)) == 1
    with pytest.raises(UsageError, match="tta=hflip mirrors images"):
        ct.views_of(np.zeros((2, 5), np.uint8), c, ct.Geometry((5,), "uint8", 255.0, 0.3, 0.25))


def test_uint8_contract_passes_the_pixels_and_per_channel_lengths_are_checked():
    x = np.arange(2 * 30, dtype=np.uint8).reshape(2, 6, 5)
    got = ct.adapt(x, InputContract(range="raw", layout="nhwc", dtype="uint8"), GREY)
    assert got.dtype == np.uint8 and got.shape == (2, 6, 5, 1) and np.array_equal(got[..., 0], x)
    with pytest.raises(DataError, match="2 values, the transfer set's rows \\[3, 6, 5\\] have 3 channel"):
        COLOUR.stats((0.1, 0.2), "mean")


def test_layouts_that_fit_a_model_input():
    assert ct.fitting_layouts(GREY, ["N", 6, 5]) == ["same"]
    assert ct.fitting_layouts(GREY, ["N", 30]) == ["flat"]
    assert ct.fitting_layouts(GREY, ["N", 1, 6, 5]) == ["nchw"]
    assert ct.fitting_layouts(COLOUR, ["N", 6, 5, 3]) == ["nhwc"]
    assert ct.fitting_layouts(COLOUR, ["N", 90]) == ["flat", "flat-nhwc"]  # the gate tells them apart
    assert ct.fitting_layouts(COLOUR, ["N", "C", "H", "W"]) == ["same", "nhwc"]
    assert ct.fitting_layouts(GREY, ["N", 12, 10]) == []
    assert "resizing is the prepare stage's job" in ct.spatial_mismatch(GREY, ["N", 12, 10])


# ------------------------------------------------------------------------------------- member weights
V = np.array([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])  # one row, two members, three classes


def test_weighted_arithmetic_combination_by_hand():
    # T = 2: softmax([2, 0, 0]) = [e^2, 1, 1] / (e^2 + 2), the second member the same permuted;
    # p = 0.75 * first + 0.25 * second (weights 3:1 normalised)
    e2 = math.exp(2.0)
    a, b = e2 / (e2 + 2), 1 / (e2 + 2)
    want = [0.75 * a + 0.25 * b, 0.75 * b + 0.25 * a, b]
    got = soft.combine_soft_targets(V, 2.0, "arithmetic", [3, 1])
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-7)
    assert abs(float(got.sum()) - 1) < 1e-6


def test_weighted_geometric_combination_by_hand():
    # sum_m w_m v_m = 0.75 [4, 0, 0] + 0.25 [0, 4, 0] = [3, 1, 0]; / T = 2 -> softmax([1.5, 0.5, 0])
    z = [math.exp(1.5), math.exp(0.5), 1.0]
    want = [v / sum(z) for v in z]
    np.testing.assert_allclose(soft.combine_soft_targets(V, 2.0, "geometric", [0.75, 0.25])[0], want, atol=1e-7)


def test_equal_weights_are_the_unweighted_formula_bit_for_bit():
    v = np.random.default_rng(3).normal(0, 4, (50, 3, 10)).astype(np.float32)
    for combine in ("arithmetic", "geometric"):
        plain = soft.combine_soft_targets(v, 4.0, combine)
        assert soft.combine_soft_targets(v, 4.0, combine, [2, 2, 2]).tobytes() == plain.tobytes()
        assert soft.combine_soft_targets(v, 4.0, combine, None).tobytes() == plain.tobytes()
    assert soft.normalise_weights([1, 1, 1], 3) is None
    np.testing.assert_allclose(soft.normalise_weights([1, 3], 2), [0.25, 0.75])
    # a zero weight leaves a member out entirely
    np.testing.assert_allclose(soft.combine_soft_targets(v, 4.0, "arithmetic", [0, 1, 0]),
                               soft.tempered_softmax(v[:, 1], 4.0), atol=1e-7)


@pytest.mark.parametrize("weights, fragment", [([1, 2], "2 given for 3 members"), ([1, -1, 1], ">= 0"),
                                               ([0, 0, 0], "not all 0"), ([1, float("nan"), 1], "finite")])
def test_bad_weights(weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        soft.normalise_weights(weights, 3)


@settings(max_examples=300, deadline=None)
@given(name=st.text(min_size=1, max_size=20), folder=st.text(alphabet="ab:/=,", max_size=8))
def test_any_output_name_round_trips_through_the_syntax(name, folder):
    """Whatever an exporter names its output, the spec the stages print parses back to it, after a path
    that may hold colons (a path ending in a declaration-like tail is ended by one more ':')."""
    c = InputContract(range="unit", output=name)
    path = f"{folder}m.onnx"
    assert ct.parse_teacher(f"{path}:{c.spec()}") == ct.TeacherSpec(Path(path), c)
