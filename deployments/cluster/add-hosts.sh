#!/usr/bin/env bash
# Name machines outside the local cluster for its Pods: CoreDNS's `hosts` key (coredns.yaml) gets
# one line per argument, then CoreDNS restarts and this waits until it answers again.
#   deployments/cluster/add-hosts.sh IP=NAME[,NAME...] ...
# e.g. `add-hosts.sh 10.244.0.1=keycloak.example.org`: the facility's Keycloak, run on the node
# and reached at the bridge's address.  The list replaces the previous one; no argument clears it.
# A facility's cluster has real DNS and does not need this.
set -euo pipefail
STATE="${VISITFLOW_CLUSTER_STATE:-/var/lib/visitflow-cluster}"
export KUBECONFIG="${KUBECONFIG:-$STATE/admin.kubeconfig}"
BIN="$(bash "$(dirname "$0")/build.sh" --where)/bin"
hosts=""
for arg in "$@"; do
  case "$arg" in
    *=?*) ip=${arg%%=*}; names=${arg#*=} ;;
    *) echo "add-hosts.sh: '$arg' is not IP=NAME[,NAME...]" >&2; exit 2 ;;
  esac
  [[ "$ip" =~ ^[0-9a-fA-F:.]+$ ]] || { echo "add-hosts.sh: '$ip' is not an IP address" >&2; exit 2; }
  hosts+="$ip ${names//,/ }"$'\n'
done
patch=$(python3 -c 'import json, sys; print(json.dumps({"data": {"hosts": sys.argv[1]}}))' "$hosts")
"$BIN/kubectl" -n kube-system patch configmap coredns --type merge -p "$patch" > /dev/null
# A ConfigMap volume follows the object only at the kubelet's next sync (up to a minute): restart.
"$BIN/kubectl" -n kube-system rollout restart deployment/coredns > /dev/null
"$BIN/kubectl" -n kube-system rollout status deployment/coredns --timeout=180s > /dev/null
printf '%s' "$hosts" >&2
