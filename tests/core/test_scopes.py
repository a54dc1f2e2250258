"""The scope grammar: parsing, covers, narrowing, node-path mapping (pure logic)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visitflow.core.scopes import DataScope, OpaqueScope, RunScope, ScopeSet, grant_scopes, parse_scope
from visitflow.errors import ScopeError
from visitflow.core.layout import Layout, PathTemplate

names = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,6}\Z")
visits = st.sampled_from(["a1", "a2", "cm1234-5"])
runs = st.one_of(st.none(), st.sampled_from(["u1", "u2", "0f3a-uid"]))
data_scopes = st.builds(DataScope, st.sampled_from(["read", "write"]),
                        st.sampled_from(["data", "raw", "processed"]), visits, runs)
run_scopes = st.builds(RunScope, st.one_of(st.just("*"), st.sampled_from(["saxs_average", "peak_stats"])), visits)
scopes = st.one_of(data_scopes, run_scopes, st.builds(OpaqueScope, st.sampled_from(["openid", "profile"])))


@pytest.mark.parametrize("text,expected", [
    ("read:data:a1", DataScope("read", "data", "a1")),
    ("write:processed:a1/uid-1", DataScope("write", "processed", "a1", "uid-1")),
    ("run:saxs_average:a1", RunScope("saxs_average", "a1")),
    ("run:*:a1", RunScope("*", "a1")),
    ("openid", OpaqueScope("openid")),
    ("read:metadata", OpaqueScope("read:metadata")),  # tiled's own scope stays opaque
])
def test_parse(text, expected):
    assert parse_scope(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("bad", [
    "read:disk:a1", "delete:raw:a1", "read:raw:a1/u1/x", "read:raw:/u1", "run:saxs:a1/u1",
    "run:saxs", "read:raw:a 1", "", "run:**:a1", "write:raw:a1/",
])
def test_parse_rejects_malformed(bad):
    with pytest.raises(ScopeError):
        parse_scope(bad)


@pytest.mark.parametrize("have,want,covers", [
    ("read:data:a1", "read:raw:a1/u1", True),
    ("read:data:a1", "read:processed:a1", True),
    ("read:raw:a1", "read:data:a1", False),          # raw does not cover both stores
    ("read:raw:a1/u1", "read:raw:a1", False),        # a run does not cover its visit
    ("read:raw:a1/u1", "read:raw:a1/u2", False),
    ("read:data:a1", "write:raw:a1", False),
    ("read:data:a1", "read:raw:a2", False),
    ("run:*:a1", "run:saxs_average:a1", True),
    ("run:saxs_average:a1", "run:peak_stats:a1", False),
    ("run:saxs_average:a1", "run:*:a1", False),
    ("run:*:a1", "run:saxs_average:a2", False),
    ("openid", "openid", True),
    ("read:data:a1", "read:metadata", False),
])
def test_covers_table(have, want, covers):
    assert parse_scope(have).covers(parse_scope(want)) is covers


@given(scopes)
def test_covers_is_reflexive(s):
    assert s.covers(s)


@given(scopes, scopes, scopes)
def test_covers_is_transitive(a, b, c):
    if a.covers(b) and b.covers(c):
        assert a.covers(c)


@given(scopes, scopes)
def test_covers_is_antisymmetric(a, b):
    if a.covers(b) and b.covers(a):
        assert a == b


@given(st.frozensets(scopes, max_size=5), st.frozensets(scopes, max_size=5))
def test_narrowing_is_exactly_covering(have, want):
    have_set, want_set = ScopeSet(have), ScopeSet(want)
    assert have_set.narrows_to(want_set) == all(any(h.covers(w) for h in have) for w in want)
    # A narrowing of a narrowing is a narrowing (exchange chains cannot widen).
    if have_set.narrows_to(want_set):
        for sub in want:
            assert have_set.narrows_to(ScopeSet(frozenset({sub})))


@given(st.frozensets(scopes, max_size=5))
def test_string_round_trip(have):
    s = ScopeSet(have)
    assert ScopeSet.parse(str(s)) == s


def test_grant_is_a_narrowing_of_the_user():
    alice = ScopeSet.parse("read:data:a1 write:data:a1 run:saxs_average:a1")
    assert alice.narrows_to(grant_scopes("saxs_average", "a1", "u1"))
    assert not alice.narrows_to(grant_scopes("peak_stats", "a1", "u1"))
    assert not alice.narrows_to(grant_scopes("saxs_average", "a2", "u1"))


def test_allows_runs_and_visits():
    s = ScopeSet.parse("read:raw:a1/u1 write:processed:a1/u1 read:data:a2")
    assert s.allows("read", "raw", "a1", "u1") and not s.allows("read", "raw", "a1", "u2")
    assert not s.allows("write", "raw", "a1", "u1")
    assert s.runs("raw", "a1") == {"u1"} and s.runs("raw", "a2") is None
    assert s.runs("processed", "a1", "write") == {"u1"}
    assert s.visits() == {"a1", "a2"} and s.touches("processed", "a1") and not s.touches("raw", "a3")


def test_lenient_drops_malformed():
    assert str(ScopeSet.lenient("read:data:a1 read:disk:a1 openid")) == "openid read:data:a1"


def test_layout_default():
    layout = Layout()
    assert layout.locate([]).visit is None
    loc = layout.locate(["raw", "a1"])
    assert (loc.store, loc.visit, loc.run, loc.inside_run) == ("raw", "a1", None, False)
    loc = layout.locate(["raw", "a1", "u1", "primary", "det"])
    assert (loc.store, loc.visit, loc.run, loc.inside_run) == ("raw", "a1", "u1", True)
    loc = layout.locate(["processed", "a1", "u1", "saxs_average"])
    assert (loc.store, loc.run, loc.analysis) == ("processed", "u1", "saxs_average")
    assert layout.locate(["elsewhere", "a1"]) is None


def test_layout_blueapi_style():
    t = PathTemplate("raw", "{instrument}/{proposal}/{visit}/{run}")
    assert t.match(["i22", "cm1"]).visit is None
    assert t.match(["i22", "cm1", "cm1-1", "uid"]).run == "uid"
    assert t.format(instrument="i22", proposal="cm1", visit="cm1-1", run="uid") == "i22/cm1/cm1-1/uid"
    assert t.prefix(instrument="i22", proposal="cm1", visit="cm1-1") == "i22/cm1/cm1-1"


@pytest.mark.parametrize("bad", ["raw/{run}", "raw/{run}/{visit}", "raw/{visit}"])
def test_layout_template_validation(bad):
    with pytest.raises(ScopeError):
        PathTemplate("raw", bad)


def test_proposal_follows_from_a_blueapi_instrument_session():
    """blueapi's layout needs {proposal}; a flow knows only (visit, run): cm12345-1 → cm12345."""
    from visitflow.core.layout import PathTemplate, implied_values

    t = PathTemplate("raw", "i22/{proposal}/{visit}/{run}")
    assert t.format(visit="cm12345-1", run="u1") == "i22/cm12345/cm12345-1/u1"
    assert t.prefix(visit="cm12345-1") == "i22/cm12345/cm12345-1"
    assert t.format(visit="cm12345-1", run="u1", proposal="other") == "i22/other/cm12345-1/u1"  # given wins
    assert implied_values({"visit": "a1"}) == {"visit": "a1"}             # not a session name: nothing implied
    with pytest.raises(KeyError, match="proposal"):
        t.format(visit="a1", run="u1")
    assert t.match(["i22", "cm12345", "cm12345-1", "u1"]).visit == "cm12345-1"


# -- per-analysis writes (issue 20, finding 6) ----------------------------------------------

def test_an_analysis_scope_covers_only_its_own_analysis():
    from visitflow.core.scopes import ScopeSet, data_token_scopes, grant_scopes, parse_scope

    mine = ScopeSet.parse("write:processed:a1/u1/saxs_average")
    assert str(parse_scope("write:processed:a1/u1/saxs_average")) == "write:processed:a1/u1/saxs_average"
    assert mine.allows("write", "processed", "a1", "u1", "saxs_average")
    assert not mine.allows("write", "processed", "a1", "u1", "peak_stats")
    assert not mine.allows("write", "processed", "a1", "u1")          # not the whole run
    assert mine.allows_some("write", "processed", "a1", "u1") and not mine.allows_some("write", "processed", "a1", "u2")
    old = ScopeSet.parse("read:raw:a1/u1 write:processed:a1/u1")         # a pre-issue-20 grant
    assert old.narrows_to(data_token_scopes("a1", "u1", analysis="saxs_average"))
    assert "write:processed:a1/u1/saxs_average" in str(grant_scopes("saxs_average", "a1", "u1"))
    with pytest.raises(ScopeError):
        parse_scope("write:raw:a1/u1/saxs_average")                      # raw has no analyses
