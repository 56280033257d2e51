#!/usr/bin/env bash
# Fault scenario: stop-heartbeat (see pnmctl drill --help and docs/PROTOCOL.md 5.14/5.15).
# Starts a device, loads KV, runs checked load on three handles, injects
# the fault, checks the device's records and that nothing was lost.
. "$(dirname "$0")/lib.sh"
drill stop-heartbeat "$@"
