#!/usr/bin/env bash
# Builds the OCI bundle that silo's tests and demos run: a busybox userland plus testprog,
# in rootfs/build/bundle (config.json + rootfs/). Idempotent, and quick when up to date.
# Prints the bundle path as its last line of stdout.
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bundle=$here/build/bundle
root=$bundle/rootfs
target=x86_64-unknown-linux-gnu
testprog=$here/testprog/target/$target/release/testprog

die() {
    echo "build.sh: $*" >&2
    exit 1
}

# ldd exits 1 with "not a dynamic executable" for static binaries, and says
# "statically linked" for static-pie ones (what rustc makes with crt-static).
is_static() {
    local out
    [ -x "$1" ] || return 1
    out=$(ldd "$1" 2>&1 || true)
    [[ $out == *"not a dynamic executable"* || $out == *"statically linked"* ]]
}

# Copies only when the content differs, so reruns leave files (and mtimes) alone.
put() {
    local mode=$1 src=$2 dst=$3
    cmp -s "$src" "$dst" || install -m "$mode" "$src" "$dst"
}

# Writes one line per argument, only when the content differs.
put_lines() {
    local dst=$1
    shift
    [ -f "$dst" ] && [ "$(<"$dst")" == "$(printf '%s\n' "$@")" ] && return
    printf '%s\n' "$@" >"$dst"
}

# 1. A static busybox on the host, to copy into the rootfs.
if ! is_static /bin/busybox; then
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update only then.
    apt-get install -y busybox-static || { apt-get update && apt-get install -y busybox-static; }
    is_static /bin/busybox || die "/bin/busybox is missing or not static after installing"
fi

# 2. testprog, statically linked against glibc (the musl target is not available here).
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain"
env -u CARGO_ENCODED_RUSTFLAGS \
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$here/testprog/target" \
    cargo build --release --locked --target "$target" \
    --manifest-path "$here/testprog/Cargo.toml"
is_static "$testprog" || die "$testprog is not statically linked"

# 3. The root filesystem.
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run,var}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
put 0755 /bin/busybox "$root/bin/busybox"
put 0755 "$testprog" "$root/bin/testprog"
while read -r applet; do
    # The list names busybox itself; a link there would replace the binary.
    [ "$applet" = busybox ] && continue
    # Relative links resolve the same inside the container and when inspected from the host.
    [ -L "$root/bin/$applet" ] || ln -sfn busybox "$root/bin/$applet"
done < <("$root/bin/busybox" --list)

put_lines "$root/etc/passwd" 'root:x:0:0:root:/root:/bin/sh' \
    'nobody:x:65534:65534:nobody:/nonexistent:/bin/false'
put_lines "$root/etc/group" 'root:x:0:' 'nogroup:x:65534:'
put_lines "$root/etc/hostname" silo
put_lines "$root/etc/hosts" '127.0.0.1	localhost' '::1	localhost ip6-localhost ip6-loopback'

# 4. The runtime config. The template has no placeholders yet; it is copied as is.
put 0644 "$here/config.json.in" "$bundle/config.json"

echo "$bundle"
