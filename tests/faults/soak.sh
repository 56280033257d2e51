#!/usr/bin/env bash
# Soak: random faults (every class but kill-unit and abort) under mixed
# load for --minutes N (default 10); prints commands, faults, recoveries,
# wrong answers (0) and rows lost (0).
. "$(dirname "$0")/lib.sh"
minutes=10
if [ "${1:-}" = "--minutes" ]; then minutes=$2; shift 2; fi
drill soak --minutes "$minutes" "$@"
