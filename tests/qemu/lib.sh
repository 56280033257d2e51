# Shared by the harnesses (run.sh, cxl.sh), sourced after ROOT, HERE and
# WORK are set.

# Builds the binaries (PNM_PROFILE, default release) and the guest's data:
# sets OUT (the profile's target directory) and PNMCTL; the guest runs this
# very pnmctl, stripped, from $WORK/guest-bin.
build_binaries_and_data() {
    local profile=${PNM_PROFILE:-release}
    OUT=$([ "$profile" = dev ] && echo debug || echo "$profile")
    (cd "$ROOT" && cargo build -q --profile "$profile" -p pnm-device -p pnm-tools)
    PNMCTL=$ROOT/target/$OUT/pnmctl
    mkdir -p "$WORK/guest-bin" "$WORK/data"
    strip -o "$WORK/guest-bin/pnmctl" "$PNMCTL"
    python3 "$HERE/guest_data.py" make "$WORK/data" "${SEED:-$$}"
}

# A host process's own sequence on the device at $REGION (HOST_SEQ), and
# its Top-K with the timings left out, so every answer compares equal to
# the first.
load_host_sequence() {
    HOST_SEQ=$("$PNMCTL" --device "$REGION" --json kv load --keys "$WORK/data/keys.npy" \
        --values "$WORK/data/values.npy" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
}
host_topk() {
    "$PNMCTL" --device "$REGION" --json topk --seq "$HOST_SEQ" --layer 0 --head 1 -k 32 \
        --query "$WORK/data/query.npy" | sed 's/"device_ns":[0-9]*,//; s/,"model_ns":[0-9]*//'
}
