#!/usr/bin/env bash
# The test command: set-up, build every binary (the end-to-end tests start them as child
# processes), then every test of the workspace with cargo-nextest. Extra arguments go to
# `cargo nextest run`: a filter (`scripts/test.sh e2e_`), a package (`scripts/test.sh -p
# drills`, which replaces --workspace), a profile (`--profile ci`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
        -p | -p* | --package | --package=*) scope=() ;;
    esac
done

bash scripts/setup.sh
cargo build --workspace --bins
cargo nextest run "${scope[@]}" --no-fail-fast "$@"
