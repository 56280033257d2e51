//! The real `pnm-device` binary in its own process, driven by the host
//! driver and by `pnmctl`.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{DeviceProcess, TempRegion, open, run};
use nix::sys::signal::Signal;
use pnm_host::commands::EventKind;
use pnm_host::{Device, Error, EventLog, TopkRequest};
use pnm_protocol::commands::{CEL_UUID, GetLogInput};
use pnm_protocol::regs::{self, pnm};
use pnm_protocol::{Dtype, Opcode, RegionLayout, ReturnCode};
use zerocopy::IntoBytes;

const SHORT: Duration = Duration::from_millis(300);

fn expect_code(result: pnm_host::Result<Vec<u8>>, code: ReturnCode) {
    match result {
        Err(Error::Command { code: got, .. }) => assert_eq!(got, code),
        other => panic!("expected {code}, got {other:?}"),
    }
}

#[test]
fn every_command_through_a_separate_device_process() {
    let region = TempRegion::new("all");
    let _device =
        DeviceProcess::start(region.path(), &["--size", "512MiB", "--compute-units", "3"]);
    let dev = Device::open(region.path()).unwrap();
    let layout = RegionLayout::new(512 << 20, None).unwrap();
    assert_eq!(dev.layout(), layout);

    let id = dev.identify().unwrap();
    assert_eq!(id.total_capacity_bytes, layout.dram_size / (256 << 20) * (256 << 20));
    assert_eq!(id.volatile_only_capacity_bytes, id.total_capacity_bytes);
    assert_eq!(id.persistent_only_capacity_bytes, 0);
    assert!(id.fw_revision.starts_with("pnm-fw"));

    let health = dev.health_info().unwrap();
    assert_eq!(health.dirty_shutdown_count, 0);
    assert_eq!(health.media_status, 0);

    assert_eq!(dev.get_timestamp().unwrap(), 0, "never set reads as 0");
    dev.set_timestamp(1_700_000_000_000_000_000).unwrap();
    let t = dev.get_timestamp().unwrap();
    assert!((1_700_000_000_000_000_000..1_700_000_010_000_000_000).contains(&t), "{t}");

    let cel: Vec<u16> = dev.command_effects_log().unwrap().iter().map(|e| e.opcode).collect();
    // Every opcode but fault injection, which this device was not started with.
    let served: Vec<u16> =
        Opcode::ALL.iter().filter(|o| !Opcode::INJECTION.contains(o)).map(|o| o.0).collect();
    assert_eq!(cel, served);

    let info = dev.identify_pnm().unwrap();
    assert_eq!(info.compute_units, 3);
    assert_eq!(info.dram_offset, layout.dram_offset);
    assert_eq!(info.dma_window_size, layout.dma_window_size);
    assert_eq!(info.dtypes, ["f32", "f16", "bf16"]);
    assert!(dev.is_alive(Duration::from_secs(1)), "heartbeat advances");
}

#[test]
fn bad_commands_get_spec_return_codes_and_the_device_keeps_serving() {
    let region = TempRegion::new("bad");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    for op in [0x0001, 0x0104, 0x4306, 0xC0FF, 0xFFFF] {
        expect_code(dev.mailbox_raw(Opcode(op), &[]), ReturnCode::UNSUPPORTED);
    }
    expect_code(
        dev.mailbox_raw(Opcode::IDENTIFY_MEMORY_DEVICE, &[1]),
        ReturnCode::INVALID_PAYLOAD_LENGTH,
    );
    expect_code(
        dev.mailbox_raw(Opcode::SET_TIMESTAMP, &[0; 4]),
        ReturnCode::INVALID_PAYLOAD_LENGTH,
    );
    expect_code(dev.mailbox_raw(Opcode::GET_LOG, &[0; 0x20]), ReturnCode::INVALID_PAYLOAD_LENGTH);
    let mut get_log = GetLogInput { log_id: [0xAB; 16], offset: 0.into(), length: 4.into() };
    expect_code(dev.mailbox_raw(Opcode::GET_LOG, get_log.as_bytes()), ReturnCode::INVALID_LOG);
    get_log.log_id = CEL_UUID;
    get_log.offset = 1_000_000.into();
    expect_code(dev.mailbox_raw(Opcode::GET_LOG, get_log.as_bytes()), ReturnCode::INVALID_INPUT);
    // Too large for the payload: the driver refuses before touching the device.
    let huge = vec![0u8; 1 << 13];
    assert!(matches!(dev.mailbox_raw(Opcode::GET_LOG, &huge), Err(Error::InputTooLarge { .. })));
    // Still serving, with nothing changed by the failures.
    assert_eq!(dev.get_timestamp().unwrap(), 0);
    assert!(dev.identify().is_ok());
}

#[test]
fn stopped_device_gives_timeout_then_busy_then_recovers() {
    let region = TempRegion::new("busy");
    let device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let first = open(region.path(), SHORT);
    let second = open(region.path(), SHORT);
    device.freeze();
    let start = Instant::now();
    match first.identify() {
        Err(Error::Timeout { heartbeat_stopped, .. }) => assert!(heartbeat_stopped),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(start.elapsed() < SHORT * 4, "the wait is bounded");
    // The first command still holds the doorbell.
    assert!(matches!(second.health_info(), Err(Error::MailboxBusy)));
    device.signal(Signal::SIGCONT);
    let start = Instant::now();
    loop {
        match second.health_info() {
            Ok(_) => break,
            Err(Error::MailboxBusy) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            other => panic!("device did not recover: {other:?}"),
        }
    }
}

#[test]
fn device_killed_mid_wait_is_a_timeout_not_a_hang() {
    let region = TempRegion::new("kill");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), SHORT);
    device.signal(Signal::SIGKILL);
    device.wait(Duration::from_secs(5)).expect("killed device exits");
    match dev.identify() {
        Err(Error::Timeout { heartbeat_stopped, waited, .. }) => {
            assert!(heartbeat_stopped);
            assert!(waited >= SHORT && waited < SHORT * 4);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn second_device_on_a_served_region_is_refused() {
    let region = TempRegion::new("twice");
    let first = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let out = run("pnm-device", &["--path", region.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("already served by another pnm-device (pid {})", first.pid())),
        "{stderr}"
    );
    // The first device is untouched.
    assert!(Device::open(region.path()).unwrap().identify().is_ok());
}

#[test]
fn restart_keeps_device_dram_and_counts_dirty_shutdowns() {
    let region = TempRegion::new("restart");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let layout = Device::open(region.path()).unwrap().layout();
    // The end of DRAM: a KV frame no sequence owns, so only persistence
    // (not the KV store) is under test here.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(region.path()).unwrap();
    file.write_all_at(&pattern, layout.dram_offset + layout.dram_size - 8192).unwrap();

    // Orderly stop: exit 0, device marked not ready.
    assert_eq!(device.stop(), Some(0));
    assert!(matches!(Device::open(region.path()), Err(Error::NotReady { .. })));

    let mut device = DeviceProcess::start(region.path(), &[]);
    let dev = Device::open(region.path()).unwrap();
    assert_eq!(dev.layout(), layout, "existing region keeps its size");
    assert_eq!(dev.health_info().unwrap().dirty_shutdown_count, 0);
    let mut back = vec![0u8; pattern.len()];
    file.read_exact_at(&mut back, layout.dram_offset + layout.dram_size - 8192).unwrap();
    assert_eq!(back, pattern);

    // A crash leaves the shutdown dirty; the next device counts it.
    device.signal(Signal::SIGKILL);
    device.wait(Duration::from_secs(5)).unwrap();
    drop(dev);
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    assert_eq!(dev.health_info().unwrap().dirty_shutdown_count, 1);
    assert_eq!(dev.status().dirty_shutdown_count, 1);
    // ... and says so in its warning log: a Memory Module record (Health
    // Status Change) carrying the new count.
    assert_eq!(dev.event_status(), 1 << EventLog::Warning as u32);
    let warnings = dev.get_event_records(EventLog::Warning).unwrap();
    assert_eq!(warnings.records.len(), 1);
    match &warnings.records[0].kind {
        EventKind::MemoryModule { device_event_type: 0, health } => {
            assert_eq!(health.dirty_shutdown_count, 1)
        }
        other => panic!("expected a Memory Module record, got {other:?}"),
    }
    dev.clear_event_records(EventLog::Warning, &[warnings.records[0].handle]).unwrap();
    assert!(dev.get_event_records(EventLog::Warning).unwrap().records.is_empty());
    assert_eq!(dev.event_status(), 0);
    // A handle that names nothing: Invalid Handle, and nothing changes.
    let again = dev.clear_event_records(EventLog::Warning, &[warnings.records[0].handle]);
    assert_eq!(again.unwrap_err().return_code(), Some(ReturnCode::INVALID_HANDLE));
    file.read_exact_at(&mut back, layout.dram_offset + layout.dram_size - 8192).unwrap();
    assert_eq!(back, pattern, "DRAM survives a crash too");
}

#[test]
fn mismatched_size_is_refused_without_touching_contents() {
    let region = TempRegion::new("size");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    assert_eq!(device.stop(), Some(0));
    let out = run("pnm-device", &["--path", region.path().to_str().unwrap(), "--size", "128MiB"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reformat"));
    assert_eq!(std::fs::metadata(region.path()).unwrap().len(), 64 << 20);
    let out = run("pnm-device", &["--path", region.path().to_str().unwrap(), "--size", "96MiB"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

#[test]
fn garbage_and_short_region_files_are_refused() {
    let region = TempRegion::new("garbage");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let garbage: Vec<u8> = (0..(4 << 20))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(region.path(), &garbage).unwrap();
    assert!(matches!(Device::open(region.path()), Err(Error::NotADevice { .. })));

    // The device will not overwrite a file it does not recognise...
    let out = run("pnm-device", &["--path", region.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid pnm region"));
    assert_eq!(std::fs::read(region.path()).unwrap(), garbage);
    // ...unless told to.
    let _device = DeviceProcess::start(region.path(), &["--reformat"]);
    assert!(Device::open(region.path()).unwrap().identify().is_ok());

    let short = TempRegion::new("short");
    std::fs::write(short.path(), [0u8; 100]).unwrap();
    match Device::open(short.path()) {
        Err(Error::NotADevice { reason, .. }) => assert!(reason.contains("smaller"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let zeros = TempRegion::new("zeros");
    std::fs::write(zeros.path(), vec![0u8; 1 << 20]).unwrap();
    assert!(matches!(Device::open(zeros.path()), Err(Error::NotADevice { .. })));
    assert!(matches!(Device::open("/nonexistent/cxl-pnm"), Err(Error::Open { .. })));
}

#[test]
fn wrong_abi_major_is_refused() {
    let region = TempRegion::new("abi");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    assert_eq!(device.stop(), Some(0));
    let file = std::fs::OpenOptions::new().write(true).open(region.path()).unwrap();
    let other = regs::ABI_VERSION_MAJOR + 1;
    let abi = (u32::from(other) << 16).to_le_bytes();
    file.write_all_at(&abi, regs::PNM_OFFSET + pnm::ABI_VERSION).unwrap();
    assert!(matches!(
        Device::open(region.path()),
        Err(Error::AbiMismatch { found_major, .. }) if found_major == other
    ));
}

#[test]
fn reset_clears_volatile_state_and_counts() {
    let region = TempRegion::new("reset");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    dev.set_timestamp(42).unwrap();
    dev.reset(Duration::from_secs(2)).unwrap();
    assert_eq!(dev.status().reset_count, 1);
    assert_eq!(dev.get_timestamp().unwrap(), 0);
}

#[test]
fn pnmctl_answers_in_text_and_json() {
    let region = TempRegion::new("ctl");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let path = region.path().to_str().unwrap();
    for command in ["identify", "health", "timestamp", "logs", "pnm-info", "status"] {
        let out = run("pnmctl", &["--device", path, command]);
        assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
        let out = run("pnmctl", &["--device", path, "--json", command]);
        assert!(out.status.success(), "{command} --json");
        let _: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    }
    let out = run("pnmctl", &["--device", path, "--json", "timestamp", "set", "--ns", "123456789"]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(value["timestamp_ns"].as_u64().unwrap() >= 123456789);
    let out = run("pnmctl", &["--device", path, "--json", "logs"]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // All but fault injection (not allowed on this device).
    assert_eq!(
        value["command_effects_log"].as_array().unwrap().len(),
        Opcode::ALL.len() - Opcode::INJECTION.len()
    );
    let out = run("pnmctl", &["--device", "/dev/shm/cxl-pnm-does-not-exist", "identify"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1, "one-line error");
}

#[test]
fn pnmctl_bench_kernel_reports_every_case_in_process_and_through_the_device() {
    let region = TempRegion::new("kbench");
    let _device = DeviceProcess::start(region.path(), &["--size", "256MiB"]);
    let path = region.path().to_str().unwrap();
    let args = ["--tokens", "3000", "--dtypes", "f16,bf16,f32", "--groups", "1,3", "-k", "5,100"];
    let out =
        run("pnmctl", &[&["--device", path, "bench", "kernel", "--reps", "1"], &args[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3 * 2 * 2);
    for case in cases {
        assert_eq!(case["in_process"]["selected"], case["k"], "{case}");
        assert!(case["in_process"]["topk_gather_min_ms"].as_f64().unwrap() > 0.0, "{case}");
        assert!(case["in_process"]["warm_min_ms"].as_f64().unwrap() > 0.0, "{case}");
        // 3000 tokens hold whole tiles: the in-cache rate is measured.
        assert!(case["in_process"]["in_cache"]["gflop_per_s"].as_f64().unwrap() > 0.0, "{case}");
        assert!(case["roofline"]["memory_read_gb_per_s"].as_f64().unwrap() > 0.1, "{case}");
        assert!(case["through_device"]["device_kernel_min_ms"].as_f64().unwrap() > 0.0);
    }
    // Without a device: the in-process figures alone, and a usage error for a bad grid.
    let out = run(
        "pnmctl",
        &[
            &["--device", "/nonexistent", "bench", "kernel", "--no-device", "--reps", "1"],
            &args[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(report["cases"][0].get("through_device").is_none());
    let out = run("pnmctl", &["bench", "kernel", "--no-device", "--groups", "9"]);
    assert!(!out.status.success());
}

#[test]
fn pnmctl_bench_topk_reports_the_path_against_the_device_kernel_and_in_process() {
    let region = TempRegion::new("tbench");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let path = region.path().to_str().unwrap();
    for extra in [&["--group", "1"][..], &["--group", "2", "--interrupts"][..]] {
        let base =
            ["--device", path, "bench", "topk", "--tokens", "3000", "-k", "40", "--reps", "3"];
        let out = run("pnmctl", &[&base[..], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        for field in ["host_latency_ms", "device_kernel_ms", "in_process_ms", "x_in_process"] {
            assert!(report[field].as_f64().unwrap() > 0.0, "{field}: {report}");
        }
        let ratio =
            report["host_latency_ms"].as_f64().unwrap() / report["in_process_ms"].as_f64().unwrap();
        assert!((report["x_in_process"].as_f64().unwrap() - ratio).abs() < 1e-9, "{report}");
        assert_eq!(report["k"], 40);
        // The command path: positive, and ordered as quantiles are.
        let path = &report["command_path_us"];
        let (p50, p99) = (path["p50"].as_f64().unwrap(), path["p99"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= path["p90"].as_f64().unwrap() && p50 <= p99, "{report}");
    }
    let out = run("pnmctl", &["--device", path, "bench", "topk", "-k", "0"]);
    assert!(!out.status.success(), "k 0 is a usage error");
}

#[test]
fn pnmctl_model_answers_from_profiles_without_a_device() {
    let out = run(
        "pnmctl",
        &["--json", "model", "--model", "llama-3-70b", "--context", "131072", "--batch", "1"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The seed's formula: 2 x 80 layers x 8 KV heads x 128 x 2 bytes x 131072 = 40 GiB.
    assert_eq!(v["kv_cache_bytes"], 40u64 << 30);
    let answers = v["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 3, "every built-in profile");
    let pnm = answers.iter().find(|a| a["profile"] == "cxl-pnm").unwrap();
    assert!(pnm["near_memory_ms"].as_f64().unwrap() < pnm["stream_all_ms"].as_f64().unwrap());
    let dir = std::env::temp_dir().join(format!("pnm-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let custom = dir.join("fast.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/firmware-model/profiles/cxl-pnm.toml"
    ))
    .unwrap()
    .replace("name = \"cxl-pnm\"", "name = \"doubled\"")
    .replace("link_bandwidth_gb_per_s = 63.0", "link_bandwidth_gb_per_s = 126.0");
    std::fs::write(&custom, text).unwrap();
    let out = run("pnmctl", &["--json", "model", "--profile", custom.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["answers"][0]["profile"], "doubled");
    // The system model and its charts.
    let charts = dir.join("charts");
    let out =
        run("pnmctl", &["--json", "model", "--modules", "4", "--plot", charts.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let system = &v["system_model"];
    let pnm = &system["answer"]["pnm"];
    assert!(
        pnm["link_bytes"].as_f64().unwrap()
            < system["answer"]["stream_all"]["link_bytes"].as_f64().unwrap()
    );
    assert_eq!(system["scaling_filled"].as_array().unwrap().len(), 16);
    assert_eq!(system["talk"]["batch_for_6_4_tb"], 149);
    for chart in
        ["step-time-vs-context", "throughput-vs-modules", "link-bytes-vs-k", "energy-per-token"]
    {
        let svg = std::fs::read_to_string(charts.join(format!("{chart}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("PNM"), "{chart}");
    }
    // Measured figures beside the model: a main-job report and set bench output.
    let report = dir.join("main.json");
    std::fs::write(
        &report,
        r#"{"context_tokens": 32776, "mean_step_ms": 51.0, "shape": {"layers": 4, "heads": 8}, "devices": 2}"#,
    )
    .unwrap();
    let bench = dir.join("bench.json");
    std::fs::write(
        &bench,
        r#"{"set_speedup_vs_one_unit": 1.6, "configs": [{}, {}, {"config": "2 devices x 1 compute unit (set)"}]}"#,
    )
    .unwrap();
    let (plot, m1, m2) =
        (charts.to_str().unwrap(), report.to_str().unwrap(), bench.to_str().unwrap());
    let out = run("pnmctl", &["model", "--plot", plot, "--measured", m1, "--measured", m2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(charts.join("step-time-vs-context.svg")).unwrap();
    assert!(svg.contains("measured here: main job, 4 layers x 8 KV heads, 2 devices"), "{svg}");
    let svg = std::fs::read_to_string(charts.join("throughput-vs-modules.svg")).unwrap();
    assert!(svg.contains("measured here: device-set speed-up"));
    let out = run("pnmctl", &["model", "--plot", plot, "--measured", custom.to_str().unwrap()]);
    assert!(!out.status.success(), "a file that is neither is refused");
    std::fs::write(&custom, "name = 3").unwrap();
    let out = run("pnmctl", &["model", "--profile", custom.to_str().unwrap()]);
    assert!(!out.status.success(), "a malformed profile is an error");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_client_written_from_the_cxl_spec_gets_conformant_answers() {
    let region = TempRegion::new("spec");
    let _device = DeviceProcess::start(region.path(), &["--size", "1GiB"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spec_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(region.path())
        .output()
        .expect("python3 runs the independent spec client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

/// The CPUs each compute-unit thread of `pid` may run on.
fn unit_cpus(pid: u32) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if name.starts_with("pnm-cu") {
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
            lists.push(line.split_whitespace().nth(1).unwrap().to_string());
        }
    }
    lists.sort();
    lists
}

#[test]
fn compute_units_are_pinned_one_per_cpu_unless_told_not_to() {
    let region = TempRegion::new("pin");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut device = DeviceProcess::start(region.path(), &["--size", "16MiB"]);
    let pinned = unit_cpus(device.pid());
    assert_eq!(pinned.len(), cpus, "one unit per CPU by default");
    let mut distinct = pinned.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), cpus, "each on its own CPU: {pinned:?}");
    assert!(pinned.iter().all(|l| !l.contains(['-', ','])), "one CPU each: {pinned:?}");
    device.stop();
    let device = DeviceProcess::start(region.path(), &["--no-pin"]);
    let free = unit_cpus(device.pid());
    let whole = std::fs::read_to_string(format!("/proc/{}/status", device.pid())).unwrap();
    let whole = whole.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
    let whole = whole.split_whitespace().nth(1).unwrap();
    assert!(free.iter().all(|l| l == whole), "--no-pin leaves {free:?} on {whole}");
}

#[test]
fn a_damaged_kv_store_stops_the_start_and_only_reformat_discards_it() {
    let region = TempRegion::new("damaged");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = pnm_host::KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    let seq = dev.kv_create(shape).unwrap();
    let rows = vec![0x3Cu8; 64 * 2 * 10];
    dev.kv_append(&seq, &rows, &rows, 10, &mut |_| {}).unwrap();
    let dram = dev.layout().dram_offset;
    drop(dev);
    assert_eq!(device.stop(), Some(0));

    // Random bytes over the KV superblock.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(region.path()).unwrap();
    let noise: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    file.write_all_at(&noise, dram).unwrap();
    let before = std::fs::read(region.path()).unwrap();
    let out = run("pnm-device", &["--path", region.path().to_str().unwrap()]);
    assert!(!out.status.success(), "a damaged store must not be served");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KV superblock is damaged") && stderr.contains("--reformat"),
        "{stderr}"
    );
    assert!(std::fs::read(region.path()).unwrap() == before, "the refused start changed the file");

    // --reformat discards it, keeping the region's size.
    let _device = DeviceProcess::start(region.path(), &["--reformat"]);
    let dev = Device::open(region.path()).unwrap();
    assert_eq!(dev.layout().size, 64 << 20);
    assert!(dev.kv_list().unwrap().is_empty());
    assert_eq!(dev.health_info().unwrap().dirty_shutdown_count, 0);
}

#[test]
fn reformat_discards_a_valid_region_too() {
    let region = TempRegion::new("reformat");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = pnm_host::KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 16 };
    dev.kv_create(shape).unwrap();
    drop(dev);
    assert_eq!(device.stop(), Some(0));
    let _device = DeviceProcess::start(region.path(), &["--reformat"]);
    let dev = Device::open(region.path()).unwrap();
    assert!(dev.kv_list().unwrap().is_empty(), "--reformat starts afresh");
    assert_eq!(dev.layout().size, 64 << 20);
}

#[test]
fn a_region_truncated_under_the_device_stops_it_cleanly_with_a_clear_error() {
    for shrink_to in [0u64, 4096, 32 << 20] {
        let region = TempRegion::new("truncate");
        let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
        // Keep the device's stderr: the error must say what happened.
        let file = std::fs::OpenOptions::new().write(true).open(region.path()).unwrap();
        file.set_len(shrink_to).unwrap();
        let code = device.wait(Duration::from_secs(5));
        assert_eq!(code, Some(2), "truncated to {shrink_to}: exit code 2, not a signal");
    }
}

#[test]
fn pnmctl_status_tells_running_hung_dead_and_stopped_apart() {
    let region = TempRegion::new("status");
    let path = region.path().to_str().unwrap();
    let state = |want_code: i32, want: &str| {
        let out = run("pnmctl", &["--device", path, "--json", "status"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(json["state"], want, "{json}");
        assert_eq!(out.status.code(), Some(want_code), "{want}");
        json
    };
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let json = state(0, "running");
    assert_eq!(json["device_pid"], device.pid());
    device.freeze();
    state(4, "hung");
    device.signal(Signal::SIGCONT);
    state(0, "running");
    device.signal(Signal::SIGKILL);
    device.wait(Duration::from_secs(5)).unwrap();
    state(3, "dead");
    let mut device = DeviceProcess::start(region.path(), &[]);
    assert_eq!(device.stop(), Some(0));
    state(2, "stopped");
    // Not a region at all: an error, exit 1.
    let text = TempRegion::new("status-text");
    std::fs::write(text.path(), vec![7u8; 1 << 16]).unwrap();
    let out = run("pnmctl", &["--device", text.path().to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_kv_load_that_times_out_reports_what_is_left_without_a_second_timeout() {
    use pnm_tools::tensorfile::{Tensor, write_npy};
    let region = TempRegion::new("loadstuck");
    let device = DeviceProcess::start(region.path(), &["--size", "1GiB"]);
    let dev = Device::open(region.path()).unwrap();
    // Large enough that the load is still running when the device stops.
    let (heads, tokens, dim) = (8usize, 65_536usize, 128usize);
    let data: Vec<u8> =
        (0..heads * tokens * dim).flat_map(|i| ((i % 61) as u16).to_le_bytes()).collect();
    let tensor = Tensor { dtype: Dtype::F16, shape: vec![1, heads, tokens, dim], data };
    let dir = std::env::temp_dir().join(format!("cxl-pnm-loadstuck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (k, v) = (dir.join("k.npy"), dir.join("v.npy"));
    write_npy(&k, &tensor).unwrap();
    write_npy(&v, &tensor).unwrap();
    drop(tensor);
    let child = std::process::Command::new(common::bin("pnmctl"))
        .args(["--device", region.path().to_str().unwrap()])
        .args(["--timeout-ms", "1000", "--command-timeout-ms", "1000", "kv", "load"])
        .env("RUST_LOG", "pnm_host=debug")
        .arg("--keys")
        .arg(&k)
        .arg("--values")
        .arg(&v)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the device as soon as the sequence exists: the load is stuck.
    let start = Instant::now();
    let seq = loop {
        if let Some(s) = dev.kv_list().unwrap().first() {
            break s.id;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the load never created its sequence");
        std::thread::sleep(Duration::from_millis(1));
    };
    device.freeze();
    let frozen = Instant::now();
    let out = child.wait_with_output().unwrap();
    let waited = frozen.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("sequence {seq} was created and is left empty")), "{stderr}");
    // One timeout, not two: the free on the stuck queue is not attempted.
    assert!(
        waited < Duration::from_millis(1900),
        "pnmctl took {waited:?} after the device stopped:\n{stderr}"
    );
    device.signal(Signal::SIGCONT);
    let left = dev.kv_sequence(seq).unwrap();
    assert_eq!(left.tokens, 0, "the atomic append left nothing");
    dev.kv_free(seq).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_the_owner_and_group_may_open_the_region_and_its_socket() {
    use std::os::unix::fs::PermissionsExt;
    let region = TempRegion::new("modes");
    // A region left open to everyone (by a wide umask, or by hand).
    std::fs::write(region.path(), []).unwrap();
    std::fs::set_permissions(region.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(region.path()) & 0o007, 0, "the region is closed to others");
    let socket = pnm_protocol::notify::socket_path(region.path());
    assert_eq!(mode(&socket) & 0o007, 0, "the socket is closed to others");
}

#[test]
fn impossible_device_requests_are_refused_up_front_and_leave_no_file() {
    let region = TempRegion::new("refused");
    let path = region.path().to_str().unwrap();
    for (args, says) in [
        (vec!["--size", "3MiB"], "not a power of two"),
        (vec!["--size", "1TiB"], "does not fit"),
        (vec!["--compute-units", "0"], "compute-units"),
    ] {
        let out = run("pnm-device", &[&["--path", path][..], &args].concat());
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!region.path().exists(), "{args:?} left a file behind");
    }
}

/// Runs the main job, which must fail; its stderr.
fn main_job_fails(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cxl-pnm"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_main_job_refuses_what_it_cannot_do_with_the_numbers() {
    assert!(main_job_fails(&["--steps", "0"]).contains("--steps must be at least 1"));
    assert!(main_job_fails(&["--tokens", "100", "-k", "200"]).contains("more than the 100 tokens"));
    let huge = main_job_fails(&["--tokens", "600000", "--layers", "32", "--head-dim", "256"]);
    assert!(huge.contains("GiB of K and V in host memory") && huge.contains("available"), "{huge}");
}

#[test]
fn broken_firmware_limits_name_the_field_the_value_and_the_limit() {
    let region = TempRegion::new("limits");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let limits = dev.identify_pnm().unwrap();
    let message = |e: Error| e.to_string();
    let wide = pnm_host::KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 512 };
    let said = message(dev.kv_create(wide).unwrap_err());
    assert!(
        said.contains(&format!(
            "head_dim 512 is outside this device's limit 1..={}",
            limits.max_head_dim
        )),
        "{said}"
    );
    let shape = pnm_host::KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 4 };
    let seq = dev.kv_create(shape).unwrap();
    let rows = vec![0u8; 16 * 4];
    let seq = dev.kv_append(&seq, &rows, &rows, 4, &mut |_| {}).unwrap();
    let one = pnm_host::Query::f32(&[1.0; 4], 4);
    let said = message(dev.topk(&TopkRequest::new(&seq, 0, 0, &one, 9000)).unwrap_err());
    assert!(
        said.contains(&format!("k 9000 is outside this device's limit 1..={}", limits.max_k)),
        "{said}"
    );
    let nine = pnm_host::Query::f32(&[1.0; 36], 4);
    let said = message(dev.topk(&TopkRequest::new(&seq, 0, 0, &nine, 2)).unwrap_err());
    assert!(
        said.contains(&format!(
            "group (queries per KV head) 9 is outside this device's limit 1..={}",
            limits.max_group
        )),
        "{said}"
    );
}

/// Options of `help` (clap's `-h` output) that have no description.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if !trimmed.starts_with('-') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        // Same-line layout: the flag, two or more spaces, the text; a
        // default or the possible values alone say nothing of what it does.
        let text = trimmed.split_once("  ").map_or("", |(_, rest)| rest);
        let said = text.split('[').next().unwrap_or("").trim();
        let same_line = !said.is_empty();
        // Next-line layout: a deeper-indented, non-empty line follows.
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let t = n.trim_start();
            !t.is_empty() && n.len() - t.len() > indent && !t.starts_with('-')
        });
        if !same_line && !next_line {
            missing.push(trimmed.to_string());
        }
    }
    missing
}

#[test]
fn every_option_of_every_command_says_what_it_does() {
    let pnmctl_commands: &[&[&str]] = &[
        &["identify"],
        &["health"],
        &["events"],
        &["inject", "event"],
        &["timestamp"],
        &["logs"],
        &["pnm-info"],
        &["status"],
        &["reset"],
        &["kv", "load"],
        &["kv", "list"],
        &["kv", "free"],
        &["topk"],
        &["gather"],
        &["model"],
        &["bench", "kernel"],
        &["bench", "nop"],
        &["bench", "topk"],
        &["bench", "datapath"],
        &[],
    ];
    let mut missing = Vec::new();
    for command in pnmctl_commands {
        let out = run("pnmctl", &[*command, &["-h"]].concat());
        let help = String::from_utf8_lossy(&out.stdout);
        missing.extend(undescribed(&help).into_iter().map(|o| format!("pnmctl {command:?}: {o}")));
    }
    let out = run("pnm-device", &["-h"]);
    missing.extend(
        undescribed(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .map(|o| format!("pnm-device: {o}")),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cxl-pnm")).arg("-h").output().unwrap();
    missing.extend(
        undescribed(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .map(|o| format!("cxl-pnm: {o}")),
    );
    assert!(missing.is_empty(), "options without a description:\n{}", missing.join("\n"));
    // A command that needs no device does not offer device options.
    let model = run("pnmctl", &["model", "-h"]);
    let help = String::from_utf8_lossy(&model.stdout);
    assert!(!help.contains("--device") && !help.contains("--timeout-ms"), "{help}");
}

#[test]
fn pnmctl_topk_takes_a_page_selection_budget() {
    use pnm_tools::tensorfile::{Tensor, write_npy};
    let region = TempRegion::new("budget");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = pnm_host::KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 64 };
    let tokens = 4096u64; // 16 pages of 256 tokens
    let keys: Vec<u8> = (0..tokens * 64)
        .flat_map(|i| (((i * 7919) % 1000) as f32 / 500.0 - 1.0).to_le_bytes())
        .collect();
    let seq = dev.kv_create(shape).unwrap();
    dev.kv_append(&seq, &keys, &keys, tokens, &mut |_| {}).unwrap();
    let query = std::env::temp_dir().join(format!("cxl-pnm-budget-q-{}.npy", std::process::id()));
    let q: Vec<u8> = (0..64).flat_map(|i| ((i as f32 * 0.37).sin()).to_le_bytes()).collect();
    write_npy(&query, &Tensor { dtype: Dtype::F32, shape: vec![64], data: q }).unwrap();
    let topk = |extra: &[&str]| -> serde_json::Value {
        let id = seq.id.to_string();
        let base = ["--device", region.path().to_str().unwrap(), "--json", "topk", "--seq", &id];
        let rest = ["--layer", "0", "--head", "0", "--query", query.to_str().unwrap(), "-k", "16"];
        let out = run("pnmctl", &[&base[..], &rest, extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let exact = topk(&[]);
    assert_eq!(exact["tokens_scored"], tokens);
    // A budget of every token is the exact Top-K.
    assert_eq!(topk(&["--budget", "4096"])["indices"], exact["indices"]);
    // A small one scores only the pages it can afford.
    let cheap = topk(&["--budget", "1024", "--sink-pages", "1", "--recent-pages", "1"]);
    assert_eq!(cheap["tokens_scored"], 1024);
    std::fs::remove_file(&query).unwrap();
}

/// An error names its cause once: a whole chain (as the main job prints it)
/// does not repeat what a message already says.
#[test]
fn error_chains_say_each_cause_once() {
    for args in
        [&["--device", "/nonexistent-pnm-region"][..], &["--kv", "/nonexistent.safetensors"]]
    {
        let said = main_job_fails(args);
        assert_eq!(said.matches("No such file or directory").count(), 1, "{args:?}: {said}");
        assert!(said.contains("/nonexistent"), "{args:?} names the path: {said}");
    }
    let out = run("pnm-device", &["--path", "/nonexistent-dir/region"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("No such file or directory").count(), 1, "{said}");
}

#[test]
fn pnmctl_injects_an_event_and_reads_it_back_from_its_log() {
    let region = TempRegion::new("inject-cli");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB", "--allow-injection"]);
    let path = region.path().to_str().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = run("pnmctl", &[&["--device", path, "--json"], args].concat());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let injected = json(&[
        "inject",
        "event",
        "--log",
        "failure",
        "--kind",
        "general-media",
        "--dpa",
        "0x1000",
        "--descriptor",
        "1",
        "--transaction",
        "1",
        "--flags",
        "8",
    ]);
    assert_eq!(injected["handle"], 1);
    let report = json(&["events", "--log", "failure", "--policy", "failure=msi:3", "--clear"]);
    assert_eq!(report["interrupt_policy"][2], "msi:3");
    let record = &report["logs"][0]["records"][0];
    assert_eq!(record["kind"]["type"], "general_media");
    assert_eq!(record["kind"]["dpa"], 4096);
    assert_eq!(record["kind"]["descriptor"], 1);
    assert_eq!(record["kind"]["transaction_type"], 1);
    assert_eq!(record["flags"], 8 | 2, "maintenance needed, in the failure log");
    // Cleared: the log is empty and Event Status says so.
    let after = json(&["events"]);
    assert_eq!(after["event_status"], 0);
    // A misaligned address is the caller's mistake, said before anything is sent.
    let out = run(
        "pnmctl",
        &["--device", path, "inject", "event", "--log", "fatal", "--kind", "dram", "--dpa", "100"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64-byte aligned"));
}
