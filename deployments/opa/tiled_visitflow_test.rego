package visitflow.tiled_test

import rego.v1

import data.tiled

run_token := ["read:metadata", "read:data", "write:data", "read:raw:a1/r1", "write:processed:a1/r1"]

visit_reader := ["read:metadata", "read:data", "read:data:a1"]

test_run_token_reads_its_raw_run_only if {
	tiled.scopes == {"read:metadata", "read:data"} with input as {"scopes": run_token, "access_tags": ["visitflow:raw:a1/r1", "visitflow:raw:a1/*"]}
	tiled.scopes == set() with input as {"scopes": run_token, "access_tags": ["visitflow:raw:a1/r2", "visitflow:raw:a1/*"]}
}

test_run_token_writes_its_processed_run_but_not_raw if {
	s := tiled.scopes with input as {"scopes": run_token, "access_tags": ["visitflow:processed:a1/r1"]}
	{"write:data", "create:node", "delete:node"} & s == {"write:data", "create:node", "delete:node"}
	r := tiled.scopes with input as {"scopes": run_token, "access_tags": ["visitflow:raw:a1/r1"]}
	not "write:data" in r
}

test_run_token_tags_list_its_run_and_visits if {
	tiled.tags == ["visitflow:processed:a1", "visitflow:processed:a1/r1", "visitflow:raw:a1", "visitflow:raw:a1/r1", "visitflow:store"] with input as {"scopes": run_token, "access_tags": []}
}

test_visit_reader_sees_all_runs_via_star if {
	"visitflow:raw:a1/*" in tiled.tags with input as {"scopes": visit_reader, "access_tags": []}
	"read:data" in tiled.scopes with input as {"scopes": visit_reader, "access_tags": ["visitflow:raw:a1/r9", "visitflow:raw:a1/*"]}
}

test_create_only_with_own_run_tags if {
	tiled.create with input as {"scopes": run_token, "access_tags": ["visitflow:processed:a1/r1", "visitflow:processed:a1/*"]}
	not tiled.create with input as {"scopes": run_token, "access_tags": ["visitflow:processed:a1/r2"]}
	not tiled.create with input as {"scopes": run_token, "access_tags": ["visitflow:raw:a1/r1"]}
	not tiled.create with input as {"scopes": run_token, "access_tags": []}
	not tiled.create with input as {"scopes": run_token, "access_tags": ["visitflow:processed:a1"]}
}

test_no_scopes_nothing if {
	tiled.scopes == set() with input as {"scopes": ["read:metadata"], "access_tags": ["visitflow:raw:a1/r1"]}
	tiled.tags == [] with input as {"scopes": [], "access_tags": []}
}

test_admin_everything if {
	"create:node" in tiled.scopes with input as {"scopes": ["visitflow:admin"], "access_tags": []}
	tiled.create with input as {"scopes": ["visitflow:admin"], "access_tags": ["visitflow:store"]}
}

test_facility_stand_in_read_only_for_members if {
	tiled.scopes == {"read:metadata", "read:data"} with input as {"scopes": [], "access_tags": ["session:12345"], "principal": {"id": "carol", "type": "user"}}
	tiled.tags == ["session:12345"] with input as {"scopes": [], "access_tags": [], "principal": {"id": "carol", "type": "user"}}
	tiled.create with input as {"scopes": [], "access_tags": ["session:12345"], "principal": {"id": "i22-writer", "type": "service"}}
	not tiled.create with input as {"scopes": [], "access_tags": ["session:12345"], "principal": {"id": "carol", "type": "user"}}
}
