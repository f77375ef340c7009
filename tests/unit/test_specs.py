"""Architecture specs (pipeline/specs.py): ``<kind>:<widths>[:dropout=<p>]``, parsed without torch.

Every well-formed spec round-trips; malformed ones are a UsageError (exit 2) naming the spec, on one
line; and no text whatever makes the parser raise anything else or accept a network that cannot be
built (property tests)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UsageError
from pipeline.specs import KINDS, Spec, parse_spec


@pytest.mark.parametrize("spec, parsed", [
    ("mlp:800-800", ("mlp", [800, 800], 0.0)),                       # Hinton's student
    ("mlp:1200-1200:dropout=0.5", ("mlp", [1200, 1200], 0.5)),       # the paper's teacher
    ("cnn:32-64-128", ("cnn", [32, 64, 128], 0.0)),                   # the default teacher
    ("cnn:4-8-16:dropout=0.25", ("cnn", [4, 8, 16], 0.25)),
    ("mlp:128", ("mlp", [128], 0.0)),
    ("  mlp:16\n", ("mlp", [16], 0.0)),                               # surrounding blanks are ignored
    ("mlp:8:dropout=0", ("mlp", [8], 0.0)),
    ("mlp", ("mlp", [], 0.0)),                                        # no hidden layer: a linear classifier
])
def test_well_formed_specs(spec, parsed):
    assert parse_spec(spec) == _spec(*parsed)


def _spec(kind, widths, dropout):
    """The Spec parse_spec returns for these (no stride given: every block at stride 1)."""
    return Spec(kind, tuple(widths), (1,) * len(widths), dropout)


@pytest.mark.parametrize("spec", [
    "", ":", "rnn:8", "MLP:8", "mlp:a", "mlp:8.5", "mlp:8-", "mlp:-8", "mlp:8--8", "mlp:0", "mlp:8-0",
    "cnn:", "cnn:32-64", "cnn:32-64-128-256", "cnn:0-64-128",
    "mlp:8:dropout=1", "mlp:8:dropout=1.5", "mlp:8:dropout=-0.1", "mlp:8:dropout=nan", "mlp:8:dropout=inf",
    "mlp:8:dropout=", "mlp:8:dropout", "mlp:8:drop=0.1", "mlp:8:dropout=0.1=0.2", "mlp:8:dropout=0.5:extra",
])
def test_malformed_specs_are_a_usage_error_naming_the_spec(spec):
    with pytest.raises(UsageError) as e:
        parse_spec(spec)
    assert repr(spec) in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


@st.composite
def _specs(draw):
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    widths = draw(st.lists(st.integers(1, 10_000), min_size=3 if kind == "cnn" else 1,
                           max_size=3 if kind == "cnn" else 5))
    dropout = draw(st.none() | st.floats(0.0, 1.0, exclude_max=True))
    text = f"{kind}:{'-'.join(map(str, widths))}" + ("" if dropout is None else f":dropout={dropout!r}")
    return text, (kind, widths, 0.0 if dropout is None else dropout)


@settings(max_examples=200, deadline=None)
@given(_specs())
def test_every_spec_of_the_grammar_round_trips(case):
    text, parsed = case
    assert parse_spec(text) == _spec(*parsed)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40),
                 st.text(alphabet="mlpcn:-=0123456789.dropoutxe+ ", max_size=30),
                 st.builds(lambda k, rest: k + rest, st.sampled_from(["mlp:", "cnn:", "mlp:8:", "cnn:1-2-3:"]),
                           st.text(max_size=20))))
def test_any_text_is_refused_cleanly_or_describes_a_buildable_network(text):
    try:
        spec = parse_spec(text)
    except UsageError as e:
        assert repr(text) in str(e)
        return
    kind, widths, dropout = spec.kind, spec.widths, spec.dropout
    assert kind in KINDS and all(isinstance(w, int) and w >= 1 for w in widths)
    assert len(spec.strides) == len(widths) and all(s in (1, 2) for s in spec.strides)
    assert len(widths) == 3 if kind == "cnn" else True
    assert math.isfinite(dropout) and 0.0 <= dropout < 1.0
