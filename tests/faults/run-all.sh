#!/usr/bin/env bash
# Every fault scenario, each on a fresh device, then a short soak
# (SOAK_MINUTES, default 0.25). Last line: FAULTS ok N | FAULTS FAIL <names>.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
failed=()
n=0
for script in "$HERE"/*.sh; do
    name=$(basename "$script" .sh)
    case $name in lib|run-all|soak) continue ;; esac
    n=$((n + 1))
    if out=$("$script" 2>"/tmp/pnm-fault-$name.err"); then
        echo "$out" | tail -1
    else
        echo "$out" | tail -30
        tail -20 "/tmp/pnm-fault-$name.err"
        failed+=("$name")
    fi
done
n=$((n + 1))
if out=$("$HERE/soak.sh" --minutes "${SOAK_MINUTES:-0.25}" 2>/tmp/pnm-fault-soak.err); then
    echo "$out" | grep -E '"(commands|faults|recoveries|wrong_answers|rows_lost|typed_errors)"'
    echo "$out" | tail -1
else
    echo "$out" | tail -30
    failed+=(soak)
fi
if [ ${#failed[@]} -eq 0 ]; then echo "FAULTS ok $n"; else echo "FAULTS FAIL ${failed[*]}"; exit 1; fi
