#!/usr/bin/env bash
# containerd, with silo as the runc binary of its runc shim, runs a container to completion
# and reports its exit code. Run by tests/runc_orchestrators.rs as `unshare --mount --net
# --fork`, with a containerd of the test's own: its root, state and sockets in WORKDIR.
# Usage: containerd.sh SILO ROOTFS WORKDIR
set -euo pipefail
silo=$1 rootfs=$2 work=$3

# The shims' sockets and ctr's FIFOs live below /run whatever the config says.
mount -t tmpfs tmpfs /run
ip link set lo up
mkdir -p "$work"/{root,state,runc}
cp -a "$rootfs" "$work/rootfs"
cat >"$work/config.toml" <<TOML
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.ttrpc.sock"
[debug]
  address = "$work/debug.sock"
[metrics]
  address = ""
TOML
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
daemon=$!
cleanup() {
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    [ -S "$work/containerd.sock" ] && break
    sleep 0.1
done
ctr() { command ctr --address "$work/containerd.sock" "$@"; }
run=(run --rm --runc-binary "$silo" --runc-root "$work/runc" --rootfs "$work/rootfs")

echo "== run to completion"
code=0
out=$(ctr "${run[@]}" c1 /bin/sh -c 'echo hello from $(hostname); exit 3') || code=$?
echo "$out (exit code $code)"
[[ $out == "hello from "* ]] || { echo "FAIL: output '$out'"; exit 1; }
[ "$code" = 3 ] || { echo "FAIL: exit code $code, not 3"; exit 1; }

echo "== ctr task kill"
ctr "${run[@]}" c2 /bin/sleep 300 &
runner=$!
for _ in $(seq 100); do
    ctr task ls 2>/dev/null | grep -q "^c2 .*RUNNING" && break
    sleep 0.1
done
ctr task ps c2
ctr task kill --signal SIGKILL c2
code=0
wait "$runner" || code=$?
echo "exit code $code"
[ "$code" = 137 ] || { echo "FAIL: exit code $code, not 137"; exit 1; }
if [ -n "$(ctr containers list -q)" ]; then
    echo "FAIL: containers left: $(ctr containers list -q)"
    exit 1
fi
# containerd's errors count as failures. (Its warning that the cleanup after `ctr run --rm`
# failed to remove the container, which is gone by then, comes with runc itself too.)
if grep "level=error" "$work/containerd.log"; then
    echo "FAIL: containerd logged errors"
    exit 1
fi
echo "containerd: all passed"
