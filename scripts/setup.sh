#!/usr/bin/env bash
# Installs what the build and the lab need, when missing (idempotent):
#   protoc (protobuf-compiler)   etcd-client's and invoker-api's build scripts
#   google/protobuf/*.proto      the well-known types protoc imports (libprotobuf-dev; only a
#                                recommendation of protobuf-compiler, which we skip)
#   PostgreSQL (initdb, ...)     the lab's primary and replica; /usr/lib/postgresql/*/bin
#   etcd (etcd-server)           the lab's per-site etcd; /usr/bin/etcd
#   nft (nftables)               partitions between the lab's sites
#   cargo-nextest                the test runner (scripts/test.sh)
# Uses apt-get (sudo when not root). Prints what it installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo --preserve-env=DEBIAN_FRONTEND)
    fi
fi

have_initdb() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
have_wkt() {
    [ -f /usr/include/google/protobuf/descriptor.proto ]
}
have_nft() {
    command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || [ -x /sbin/nft ]
}

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
have_wkt || missing+=(libprotobuf-dev)
have_initdb || missing+=(postgresql)
[ -x /usr/bin/etcd ] || missing+=(etcd-server)
have_nft || missing+=(nftables)

installed=()
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
        echo "setup: missing ${missing[*]}, and not root and no sudo to install them" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: missing ${missing[*]}; install them by hand (no apt-get here)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]} ..."
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    installed+=("${missing[@]}")
fi

# Check what apt-get could not have noticed (a package that installs elsewhere).
command -v protoc >/dev/null 2>&1 || { echo "setup: protoc still missing" >&2; exit 1; }
have_wkt || { echo "setup: /usr/include/google/protobuf/descriptor.proto still missing" >&2; exit 1; }
have_initdb || { echo "setup: initdb still missing under /usr/lib/postgresql/*/bin" >&2; exit 1; }
[ -x /usr/bin/etcd ] || { echo "setup: /usr/bin/etcd still missing" >&2; exit 1; }
have_nft || { echo "setup: nft still missing" >&2; exit 1; }

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest (cargo install; takes a few minutes) ..."
    cargo install cargo-nextest --locked
    installed+=(cargo-nextest)
fi

if [ "${#installed[@]}" -gt 0 ]; then
    echo "setup: installed ${installed[*]}"
else
    echo "setup: everything needed is already installed"
fi
