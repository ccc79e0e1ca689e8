#!/usr/bin/env bash
# The run command: set-up, build, start the lab in the background, and show the invoker
# cluster's status. Arguments go to `lab up` (e.g. `--dir /tmp/my-lab`, `--invokers-only`).
# Stop it with `target/debug/lab down` (same --dir).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# `lab endpoints` must read the same directory as `lab up`: pass --dir on through LAB_DIR.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --dir) export LAB_DIR="${args[$((i + 1))]:-}" ;;
        --dir=*) export LAB_DIR="${args[$i]#--dir=}" ;;
    esac
done

bash scripts/setup.sh
cargo build --workspace --bins
target/debug/lab up --detach "$@"
endpoints="$(target/debug/lab endpoints)"
echo
echo "invokerctl --endpoints $endpoints status"
if ! target/debug/invokerctl --endpoints "$endpoints" status; then
    echo "lab.sh: invokerctl status failed (the lab itself is up; see target/debug/lab status)" >&2
fi
echo
echo "gift-api: a $(target/debug/lab endpoints --gift-api a)  b $(target/debug/lab endpoints --gift-api b)"
echo "load:     target/debug/loadgen --lab ${LAB_DIR:-/tmp/gift-lab} --rate-per-sec 100 --duration-secs 60"
echo "money:    target/debug/reconcile --database-url \"\$(target/debug/lab endpoints --postgres a)\""
