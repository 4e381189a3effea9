#!/usr/bin/env bash
# Podman with silo as its OCI runtime, on an image imported from our rootfs. Run by
# tests/runc_orchestrators.rs as `unshare --mount --net --fork`: Podman's netns mounts, its
# bridge, its firewall rules and every file it writes stay in namespaces and directories of
# the test's own. Usage: podman.sh SILO ROOTFS WORKDIR CGROUP_PARENT
set -euo pipefail
silo=$1 rootfs=$2 work=$3 cgroup_parent=$4

# A private /run (Podman keeps netns mounts in /run/netns whatever its options),
# /var/tmp (image imports stage there) and /var/lib/containers (its blob cache stays there
# whatever --root says); the mount namespace is ours alone.
for dir in /run /var/tmp /var/lib/containers; do
    mount -t tmpfs tmpfs "$dir"
done
ip link set lo up

mkdir -p "$work"/{storage,runroot,tmp,networks}
# --ulimit: Podman's default limits exceed this host's hard limits.
limits=(--ulimit "nofile=1024:1024" --ulimit "nproc=1024:1024")
pod() {
    podman --root "$work/storage" --runroot "$work/runroot" --tmpdir "$work/tmp" \
        --storage-driver vfs --network-config-dir "$work/networks" --events-backend file \
        --cgroup-manager cgroupfs --runtime "$silo" "$@"
}
cleanup() {
    pod rm --all --force --time 0 >/dev/null 2>&1 || true
    pod rmi --all --force >/dev/null 2>&1 || true
}
trap cleanup EXIT

step() { echo "== $*"; }
fail() {
    echo "FAIL: $*"
    exit 1
}

step import
tar -C "$rootfs" -cf "$work/rootfs.tar" .
pod import "$work/rootfs.tar" localhost/silo-rootfs:test >/dev/null
run=(run --rm --cgroup-parent "$cgroup_parent" "${limits[@]}")

step "run --rm --network none echo hi"
out=$(pod "${run[@]}" --network none localhost/silo-rootfs:test echo hi)
[ "$out" = hi ] || fail "echo printed '$out'"

step "run --rm echo hi on Podman's bridge network"
out=$(pod "${run[@]}" localhost/silo-rootfs:test echo hi)
[ "$out" = hi ] || fail "echo printed '$out'"

step "exit code"
code=0
pod "${run[@]}" --network none localhost/silo-rootfs:test sh -c 'exit 7' || code=$?
[ "$code" = 7 ] || fail "exit code $code, not 7"

step "run -t: a terminal through conmon's console socket"
out=$(pod "${run[@]}" -t --network none localhost/silo-rootfs:test tty </dev/null | tr -d '\r')
[[ $out == /dev/pts/* ]] || fail "tty printed '$out'"

step "bridge network with a published port"
pod run -d --name web --cgroup-parent "$cgroup_parent" "${limits[@]}" -p 127.0.0.1:8080:8080 \
    localhost/silo-rootfs:test /bin/testprog serve 8080 >/dev/null
got=""
for _ in $(seq 50); do
    got=$(curl -sS --max-time 2 http://127.0.0.1:8080/ 2>/dev/null) && break
    sleep 0.2
done
echo "GET / -> $got"
[ -n "$got" ] || fail "the published port did not answer"

step exec
out=$(pod exec web sh -c 'echo exec in $(hostname)')
[[ $out == "exec in "* ]] || fail "exec printed '$out'"
code=0
pod exec web sh -c 'exit 3' || code=$?
[ "$code" = 3 ] || fail "exec exit code $code, not 3"

out=$(pod exec -t web tty </dev/null | tr -d '\r')
[[ $out == /dev/pts/* ]] || fail "exec -t: tty printed '$out'"

step "--pid container:web joins its pid namespace by path"
out=$(pod "${run[@]}" --network none --pid container:web localhost/silo-rootfs:test \
    cat /proc/1/cmdline | tr '\0' ' ')
[[ $out == "/bin/testprog serve 8080"* ]] || fail "pid 1 is '$out'"

step "ps, pause, unpause"
pod top web >/dev/null || fail "top"
pod pause web >/dev/null
[ "$(pod inspect --format '{{.State.Status}}' web)" = paused ] || fail "not paused"
pod unpause web >/dev/null
[ "$(pod inspect --format '{{.State.Status}}' web)" = running ] || fail "not running again"

step stop
pod stop --time 5 web >/dev/null
state=$(pod inspect --format '{{.State.Status}} {{.State.ExitCode}}' web)
echo "after stop: $state"
[[ $state == "exited "* ]] || fail "stop left it $state"
pod rm web >/dev/null

step kill
pod run -d --name sleeper --network none --cgroup-parent "$cgroup_parent" "${limits[@]}" \
    localhost/silo-rootfs:test sleep 300 >/dev/null
pod kill sleeper >/dev/null
pod wait sleeper >/dev/null
state=$(pod inspect --format '{{.State.Status}} {{.State.ExitCode}}' sleeper)
echo "after kill: $state"
[ "$state" = "exited 137" ] || fail "kill left it $state"
pod rm sleeper >/dev/null
echo "podman: all passed"
