//! Detects python3 with NumPy, the independent reference of the NumPy
//! cross-checks (tests/pnmctl_numpy.rs, tests/sharing.rs): without it those
//! tests are reported as ignored, with the reason, instead of passing
//! silently. PNM_REQUIRE_NUMPY=1 (CI) makes a missing NumPy a build error.

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(numpy)");
    println!("cargo::rerun-if-env-changed=PNM_REQUIRE_NUMPY");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=build.rs");
    let numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|out| out.status.success());
    if numpy {
        println!("cargo::rustc-cfg=numpy");
    } else if std::env::var_os("PNM_REQUIRE_NUMPY").is_some() {
        panic!("PNM_REQUIRE_NUMPY is set but python3 cannot import numpy (pip install numpy)");
    }
}
