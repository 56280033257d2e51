#!/bin/bash
# Coverage-guided fuzzing on stable Rust with afl.rs (AFL++): builds the
# targets in fuzz/targets with `cargo afl build` and runs each for
# FUZZ_SECONDS (default 60) from its seeds in fuzz/seeds/<target>.
#
# usage: fuzz/run.sh [target...]     (default: every target)
# needs: cargo install cargo-afl     (builds AFL++ once; a C compiler and make)
# Findings (crashes, hangs) stay in target/fuzz/<target>/default/; the exit
# code is 1 if any target saved a crash. Last line: FUZZ ok|FAIL.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${FUZZ_OUT:-$HERE/../target/fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-60}
command -v cargo-afl > /dev/null || { echo "FUZZ FAIL: cargo-afl missing (cargo install cargo-afl)"; exit 1; }
(cd "$HERE" && cargo afl build --release -q)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=$(ls "$HERE/targets" | sed 's/\.rs$//')
status=ok
for target in ${targets[@]}; do
    mkdir -p "$OUT/$target"
    # -V: stop after this many seconds; a fresh run each time (no resume),
    # so a short CI run starts from the seeds.
    AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
        AFL_AUTORESUME=0 \
        cargo afl fuzz -i "$HERE/seeds/$target" -o "$OUT/$target" -V "$SECONDS_EACH" \
        "$HERE/target/release/$target" > "$OUT/$target/fuzz.log" 2>&1 || true
    stats=$OUT/$target/default/fuzzer_stats
    if [ ! -f "$stats" ]; then
        echo "$target: no statistics (see $OUT/$target/fuzz.log)"
        status=FAIL
        continue
    fi
    get() { sed -n "s/^$1 *: //p" "$stats"; }
    echo "$target: $(get execs_done) executions ($(get execs_per_sec)/s), coverage $(get bitmap_cvg), corpus $(get corpus_count), crashes $(get saved_crashes), hangs $(get saved_hangs)"
    [ "$(get saved_crashes)" = 0 ] || status=FAIL
done
echo "FUZZ $status"
[ "$status" = ok ]
