#!/usr/bin/env bash
# Tear down what up.sh started, by its record ($STATE/record): pod sandboxes and their shims,
# the processes (reverse start order), kube-proxy's and the CNI network's iptables chains, the
# bridge, every mount under $STATE and the CNI network namespaces, then the sysctls' old values.
# Idempotent; a missing record means nothing to do.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${VISITFLOW_CLUSTER_STATE:-/var/lib/visitflow-cluster}"
REC="$STATE/record"
[ -s "$REC" ] || { echo "no cluster record at $REC" >&2; exit 0; }
SOCK="$STATE/containerd/containerd.sock"
BIN="$(bash "$HERE/build.sh" --where)/bin"   # never builds: only kube-proxy --cleanup needs it

# 1. containers: ask containerd to stop every task, then kill any shim it recorded.
if ctr -a "$SOCK" version > /dev/null 2>&1; then
  for t in $(ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$SOCK" -n k8s.io tasks kill -s SIGKILL "$t" > /dev/null 2>&1; done
fi
# The pods' netns paths, read from containerd's records before it goes.
NETNS=$(grep -rhoa '/var/run/netns/cni-[0-9a-f-]*' "$STATE/containerd/root/io.containerd.metadata.v1.bolt" 2>/dev/null | sort -u)
# 2. processes, newest first.
tac "$REC" | while read -r kind pid name; do
  [ "$kind" = pid ] || continue
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null
done
# Shims that outlived containerd name its socket in their arguments: exactly ours.
for p in $(pgrep -f -- "-address $SOCK\$" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
for f in "$STATE"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid \
         "$STATE"/containerd/state/io.containerd.runtime.v2.task/*/*/init.pid; do
  [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null
done
# 3. iptables: kube-proxy's own cleanup, then the CNI network's masquerade chains.
if grep -q '^iptables kube-proxy' "$REC"; then
  "$BIN/kube-proxy" --cleanup > /dev/null 2>&1
  # What --cleanup left (seen once, at load 11: KUBE-SERVICES stayed): the jumps into KUBE-*
  # chains from the built-in chains, then the KUBE-* chains themselves (ours: the record says
  # kube-proxy ran; the kubelet's own chains go too and are looked for again below).
  for ipt in iptables ip6tables; do
    for t in nat filter mangle; do
      $ipt -t "$t" -S 2>/dev/null | awk '$1=="-A" && $2 !~ /^KUBE-/ && / -j KUBE-/' | while read -r _ chain rule; do
        eval "$ipt -t $t -D $chain $rule" 2>/dev/null
      done
      chains=$($ipt -t "$t" -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^KUBE-/ {print $2}')
      for c in $chains; do $ipt -t "$t" -F "$c" 2>/dev/null; done
      for c in $chains; do $ipt -t "$t" -X "$c" 2>/dev/null; done
    done
  done
fi
# The kubelet's canary chains (it makes them even with makeIPTablesUtilChains: false).
if grep -q '^iptables kubelet' "$REC"; then
  for ipt in iptables ip6tables; do
    for t in mangle nat filter; do
      while $ipt -t "$t" -D INPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
      while $ipt -t "$t" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
      for c in KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT KUBE-FIREWALL; do
        $ipt -t "$t" -F "$c" 2>/dev/null; $ipt -t "$t" -X "$c" 2>/dev/null
      done
    done
  done
fi
net=$(awk '$1=="cni-network"{print $2}' "$REC")
if [ -n "$net" ]; then
  iptables -t nat -S POSTROUTING | grep -F "name: \\\"$net\\\"" | while read -r _ chain rule; do
    eval "iptables -t nat -D $chain $rule" 2>/dev/null
    c=$(sed -n 's/.* -j \(CNI-[0-9a-f]*\).*/\1/p' <<< "$rule")
    [ -n "$c" ] && { iptables -t nat -F "$c"; iptables -t nat -X "$c"; } 2>/dev/null
  done
  for c in $(iptables -t nat -S | awk '$1=="-N" && $2 ~ /^CNI-(HOSTPORT|DN-)/ {print $2}'); do
    iptables -t nat -F "$c" 2>/dev/null
  done
  # a Pod's chain whose POSTROUTING jump a racing CNI DEL already removed (seen once): found by
  # the network's name in its own rules
  for c in $(iptables -t nat -S | grep -F "name: \\\"$net\\\"" | awk '$1=="-A" && $2 ~ /^CNI-/ {print $2}' | sort -u); do
    iptables -t nat -F "$c" 2>/dev/null; iptables -t nat -X "$c" 2>/dev/null
  done
fi
# 4. bridge, mounts, network namespaces.
for b in $(awk '$1=="bridge"{print $2}' "$REC"); do ip link del "$b" 2>/dev/null; done
awk -v s="$STATE" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
for n in $NETNS; do umount "$n" 2>/dev/null; rm -f "$n"; done
# 5. sysctls back to what they were.
awk '$1=="sysctl"{print $2"="$3}' "$REC" | while read -r kv; do sysctl -qw "$kv"; done
rm -rf "$STATE"
echo "cluster at $STATE torn down" >&2
