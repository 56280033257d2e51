//! `pnmctl` against NumPy: see tests/numpy_check.py. Reported as ignored,
//! with the reason, where python3 has no NumPy (build.rs looks at build
//! time; after installing NumPy, `touch build.rs` or `cargo clean -p
//! cxl-pnm`); PNM_REQUIRE_NUMPY=1 (as in CI) makes that an error.

mod common;

use std::process::Command;

use common::{DeviceProcess, TempRegion, bin};

/// Runs a NumPy check script against `pnmctl` and the device(s) at
/// `regions` (comma separated) with a fresh seed; it must pass every check.
fn run_numpy_script(script: &str, regions: &str) {
    let work = std::env::temp_dir().join(format!("cxl-pnm-{script}-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
            % 100_000;
    let out = Command::new("python3")
        .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(bin("pnmctl"))
        .arg(regions)
        .arg(&work)
        .arg(seed.to_string())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&work);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "seed {seed}:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
#[cfg_attr(not(numpy), ignore = "skipped: python3 with numpy is not available (pip install numpy)")]
fn pnmctl_kv_topk_and_gather_match_numpy() {
    let region = TempRegion::new("numpy");
    let _device = DeviceProcess::start(region.path(), &["--size", "256MiB"]);
    run_numpy_script("numpy_check.py", &region.path().display().to_string());
}

#[test]
#[cfg_attr(not(numpy), ignore = "skipped: python3 with numpy is not available (pip install numpy)")]
fn pnmctl_set_topk_and_gather_match_numpy_over_the_whole_sequence() {
    let regions: Vec<TempRegion> =
        (0..3).map(|i| TempRegion::new(&format!("numpy-set{i}"))).collect();
    let _devices: Vec<DeviceProcess> =
        regions.iter().map(|r| DeviceProcess::start(r.path(), &["--size", "128MiB"])).collect();
    let paths: Vec<String> = regions.iter().map(|r| r.path().display().to_string()).collect();
    run_numpy_script("numpy_set_check.py", &paths.join(","));
}
