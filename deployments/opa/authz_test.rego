# Rego unit tests of authz.rego against data.json (`opa test deployments/opa -v`; run by
# tests/test_opa.py so they count in the pytest summary).
package visitflow.authz_test

import rego.v1

import data.visitflow.authz

alice := {"sub": "0b7c-uuid-alice", "preferred_username": "alice"}

ask(subject, action, store, visit, analysis) := d if {
	d := authz.decision with input as {
		"subject": subject, "action": action, "store": store, "visit": visit, "run": "r1", "analysis": analysis,
	}
}

test_alice_may_run_an_enabled_analysis_on_her_session if {
	d := ask(alice, "run", null, "a1", "saxs_average")
	d.allow
	contains(d.reason, "alice may run saxs_average on session a1")
}

test_alice_may_read_and_write_both_stores_of_her_session if {
	every action in ["read", "write"] {
		every store in ["raw", "processed"] {
			ask(alice, action, store, "a1", null).allow
		}
	}
}

test_fedid_claim_names_the_user if {
	ask({"sub": "x", "fedid": "alice", "preferred_username": "someone-else"}, "read", "raw", "a1", null).allow
	not ask({"sub": "x", "fedid": "mallory2", "preferred_username": "alice"}, "read", "raw", "a1", null).allow
}

test_carol_is_a_member_but_no_analyst if {
	d := ask({"preferred_username": "carol"}, "run", null, "a1", "saxs_average")
	not d.allow
	contains(d.reason, "carol may not start analyses on session a1")
	ask({"preferred_username": "carol"}, "read", "raw", "a1", null).allow
}

test_analysis_not_enabled if {
	d := ask(alice, "run", null, "a1", "rm_rf")
	not d.allow
	contains(d.reason, "analysis rm_rf is not enabled for session a1")
}

test_bob_cannot_touch_alices_session if {
	d := ask({"preferred_username": "bob"}, "read", "raw", "a1", null)
	not d.allow
	contains(d.reason, "bob is neither a member of session a1")
	not ask({"preferred_username": "bob"}, "write", "processed", "a1", null).allow
	not ask({"preferred_username": "bob"}, "run", null, "a1", "saxs_average").allow
}

test_beamline_staff_read_but_do_not_write if {
	ask({"preferred_username": "dave"}, "read", "processed", "a1", null).allow
	not ask({"preferred_username": "dave"}, "write", "processed", "a1", null).allow
}

test_unknown_and_disabled_subjects_and_sessions if {
	contains(ask({"preferred_username": "eve"}, "read", "raw", "a1", null).reason, "eve is not known")
	contains(ask({"preferred_username": "mallory"}, "read", "raw", "a1", null).reason, "mallory is disabled")
	contains(ask(alice, "read", "raw", "zz9", null).reason, "session zz9 does not exist")
	not ask({}, "read", "raw", "a1", null).allow
}

test_malformed_questions_are_refused if {
	not ask(alice, "delete", "raw", "a1", null).allow
	contains(ask(alice, "read", "data", "a1", null).reason, "unknown store")
	not authz.decision.allow with input as {}
}

test_membership_change_takes_effect if {
	not ask(alice, "read", "raw", "a1", null).allow with data.facility.sessions.a1.members as ["carol"]
}

test_readable_visits if {
	authz.readable_visits == ["a1"] with input as {"subject": alice}
	authz.readable_visits == ["a1", "a2"] with input as {"subject": {"preferred_username": "dave"}}
	authz.readable_visits == [] with input as {"subject": {"preferred_username": "eve"}}
}

act_for(subject, user, visit) := d if {
	d := authz.decision with input as {"subject": subject, "action": "act_for", "visit": visit, "for_user": user}
}

test_beamline_staff_may_act_for_a_member_of_a_session_on_their_beamline if {
	d := act_for({"preferred_username": "dave"}, "alice", "a1")
	d.allow
	contains(d.reason, "dave may act for alice on session a1")
}

test_a_member_who_is_not_staff_may_not_act_for_another_member if {
	d := act_for({"preferred_username": "carol"}, "alice", "a1")
	not d.allow
	contains(d.reason, "carol may not act for alice on session a1 (proposal cm12345, beamline i22): not staff of beamline i22")
}

test_staff_may_not_act_for_a_user_on_a_session_the_user_is_not_on if {
	d := act_for({"preferred_username": "dave"}, "alice", "a2")
	not d.allow
	contains(d.reason, "alice is not a member of session a2")
}

test_act_for_needs_the_user if {
	d := authz.decision with input as {"subject": {"preferred_username": "dave"}, "action": "act_for", "visit": "a1"}
	not d.allow
	contains(d.reason, "act_for names no user")
}

# --- beamline service accounts (blueapi `tiled.authentication: ServiceAccount`) --------------

i22_sa := {"preferred_username": "service-account-i22-blueapi-tiled", "beamline": "i22"}

b21_sa := {"preferred_username": "service-account-b21-blueapi-tiled", "beamline": "b21"}

test_the_beamline_service_account_reads_and_writes_its_beamlines_raw_data if {
	every visit in ["a1", "a2"] {
		every action in ["read", "write"] {
			ask(i22_sa, action, "raw", visit, null).allow
		}
	}
	contains(ask(i22_sa, "write", "raw", "a1", null).reason, "service-account-i22-blueapi-tiled may write raw on session a1")
}

test_the_service_account_touches_no_processed_data_and_starts_nothing if {
	every action in ["read", "write"] {
		d := ask(i22_sa, action, "processed", "a1", null)
		not d.allow
		contains(d.reason, "may not ")
		contains(d.reason, "processed data: it writes raw runs only")
	}
	d := ask(i22_sa, "run", null, "a1", "saxs_average")
	not d.allow
	contains(d.reason, "service account service-account-i22-blueapi-tiled may not start analyses")
}

test_another_beamlines_service_account_is_refused_with_a_reason if {
	every action in ["read", "write"] {
		d := ask(b21_sa, action, "raw", "a1", null)
		not d.allow
		contains(d.reason, "writes for beamline b21, not for session a1 (proposal cm12345, beamline i22)")
	}
	authz.readable_visits == [] with input as {"subject": b21_sa}
	authz.readable_visits == ["a1", "a2"] with input as {"subject": i22_sa}
}

test_the_beamline_claim_alone_makes_no_service_account if {
	# a claim naming a beamline whose list lacks the account: an unknown user, refused
	d := ask({"preferred_username": "service-account-i22-blueapi-tiled", "beamline": "b21"}, "write", "raw", "a1", null)
	not d.allow
	contains(d.reason, "not known to the user office")
	# a user with a beamline claim is still just that user
	not ask({"preferred_username": "bob", "beamline": "i22"}, "read", "raw", "a1", null).allow
	# the account's name without the claim: unknown
	not ask({"preferred_username": "service-account-i22-blueapi-tiled"}, "read", "raw", "a1", null).allow
}
