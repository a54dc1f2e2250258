"""A beamline service account's ``beamline`` claim reaches the authority through Tiled (pure:
visitflow/tiled/facility_users.py carries it in the principal's scopes; Tiled keeps only a name)."""

from __future__ import annotations

import types

from visitflow.tiled import facility_users as fu


def _claims(**raw):
    return types.SimpleNamespace(raw={"sub": "x", "iss": "http://kc", "exp": 1, "iat": 0, **raw})


def _principal(name):
    return types.SimpleNamespace(identities=[types.SimpleNamespace(id=name)])


def test_the_beamline_claim_rides_in_the_scopes_and_comes_back_as_a_claim():
    out = fu.claims_for_tiled(_claims(preferred_username="service-account-i22-blueapi-tiled", beamline="i22"), "u")
    scopes = out["scope"].split()
    assert "visitflow:beamline:i22" in scopes and fu.USER_SCOPE in scopes
    subject = fu.subject_of(_principal("service-account-i22-blueapi-tiled"), scopes)
    assert subject.policy_input() == {"preferred_username": "service-account-i22-blueapi-tiled", "beamline": "i22"}


def test_no_claim_odd_claims_and_two_beamlines_carry_nothing():
    for raw in ({}, {"beamline": "i22 write:data:a1"}, {"beamline": ["i22"]}, {"beamline": ""}):
        scopes = fu.claims_for_tiled(_claims(preferred_username="alice", **raw), "u")["scope"].split()
        assert not [s for s in scopes if s.startswith(fu.BEAMLINE_SCOPE_PREFIX)], raw
    assert fu.subject_of(_principal("alice"), ["visitflow:beamline:i22", "visitflow:beamline:b21"]).policy_input() == {
        "preferred_username": "alice"}
    assert fu.subject_of(_principal("alice")).policy_input() == {"preferred_username": "alice"}
