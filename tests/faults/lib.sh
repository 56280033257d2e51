# Shared by the fault-injection scripts: builds the binaries if needed,
# runs pnm-device (started again whenever it dies, as a supervisor would)
# on a fresh region with --allow-injection, and runs `pnmctl drill`.
# Source it; then `drill SCENARIO [drill options]`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${PNM_BIN:-$ROOT/target/release}
case $BIN in /*) ;; *) BIN=$PWD/$BIN ;; esac
if [ ! -x "$BIN/pnm-device" ] || [ ! -x "$BIN/pnmctl" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p pnm-device -p pnm-tools
fi
WORK=$(mktemp -d /dev/shm/pnm-faults.XXXXXX)
REGION=$WORK/region
DEVICE_LOG=$WORK/device.log
SUPERVISOR=

cleanup() {
    if [ -n "$SUPERVISOR" ]; then
        touch "$WORK/stop"
        pkill -TERM -f "pnm-device --path $REGION" 2>/dev/null || true
        wait "$SUPERVISOR" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Starts the device (and starts it again after any death but a stop).
start_device() {
    (
        first=1
        while [ ! -e "$WORK/stop" ]; do
            if [ $first = 1 ]; then size=(--size "${PNM_REGION_SIZE:-512MiB}"); else size=(); fi
            first=0
            "$BIN/pnm-device" --path "$REGION" "${size[@]}" --allow-injection \
                --compute-units 2 >>"$DEVICE_LOG" 2>&1 || true
            [ -e "$WORK/stop" ] || echo "pnm-device ended; starting it again" >>"$DEVICE_LOG"
        done
    ) &
    SUPERVISOR=$!
    for _ in $(seq 100); do
        "$BIN/pnmctl" --device "$REGION" status >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "pnm-device did not start; its log:" >&2
    cat "$DEVICE_LOG" >&2
    return 1
}

# Runs one drill; its JSON report goes to stdout, its last line is
# `DRILL ok|FAIL SCENARIO`.
drill() {
    [ -n "$SUPERVISOR" ] || start_device
    "$BIN/pnmctl" --device "$REGION" drill --scenario "$@"
}
