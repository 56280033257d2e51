//! Every Inject Device Fault class against a separate `pnm-device`
//! process: each ends in the typed error its bound promises (or in nothing
//! but a delay), every answer that does come back is the reference's, and
//! the device serves on afterwards. An aborted device, restarted, still
//! holds every committed row.

mod common;

use std::time::{Duration, Instant};

use common::{DeviceProcess, TempRegion};
use pnm_host::commands::EventKind;
use pnm_host::{
    Device, DeviceOptions, Dtype, Error, EventLog, KvShape, Query, Sequence, TopkRequest,
};
use pnm_protocol::faults::DeviceFault;

const D: usize = 64;
const TOKENS: u64 = 40_000;
const TIMEOUT: Duration = Duration::from_millis(400);

struct Loaded {
    seq: Sequence,
    keys: Vec<f32>,
}

fn load(device: &Device) -> Loaded {
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: D as u16 };
    let keys = common::random_f32s(0x2545_F491_4F6C_DD1D, TOKENS as usize * D);
    let bytes: Vec<u8> = keys.iter().flat_map(|x| x.to_le_bytes()).collect();
    let seq = device.kv_create(shape).unwrap();
    let seq = device.kv_append(&seq, &bytes, &bytes, TOKENS, &mut |_| {}).unwrap();
    Loaded { seq, keys }
}

fn reference(l: &Loaded, query: &[f32], k: usize) -> Vec<u32> {
    let mut scored: Vec<(u32, f64)> = (0..TOKENS as usize)
        .map(|t| {
            let key = &l.keys[t * D..(t + 1) * D];
            (t as u32, query.iter().zip(key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum())
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.into_iter().take(k).map(|(t, _)| t).collect()
}

fn open(path: &std::path::Path) -> Device {
    let options = DeviceOptions {
        command_timeout: TIMEOUT,
        mailbox_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    Device::open_with(path, &options).unwrap()
}

#[test]
fn every_device_fault_ends_in_its_typed_error_or_a_delay_and_nothing_is_wrong() {
    let region = TempRegion::new("faults");
    let mut process = DeviceProcess::start(
        region.path(),
        &["--size", "512MiB", "--allow-injection", "--compute-units", "2"],
    );
    let device = open(region.path());
    let l = load(&device);
    let query: Vec<f32> = (0..D).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
    let q = Query::f32(&query, D);
    let request = TopkRequest::new(&l.seq, 0, 0, &q, 256);
    let want = reference(&l, &query, 256);
    let check = |device: &Device| assert_eq!(device.topk(&request).unwrap().indices, want);
    check(&device);
    let inject = |f, count, micros, target| device.inject_device_fault(f, count, micros, target);

    // A dropped, or garbled, completion of a command that changes nothing:
    // it times out, the driver replaces its queue pair and runs it again,
    // all within twice its bound.
    for fault in [DeviceFault::DropCompletions, DeviceFault::CorruptCompletions] {
        let recoveries = device.recoveries();
        inject(fault, 1, 0, 0).unwrap();
        let start = Instant::now();
        check(&device);
        let took = start.elapsed();
        assert!(took >= TIMEOUT && took < 2 * TIMEOUT, "{}: {took:?}", fault.name());
        assert_eq!(device.recoveries(), recoveries + 1, "{}", fault.name());
    }
    // One that changes state is never run twice: its error says so, and
    // the state read back shows it applied exactly once.
    let before = device.kv_list().unwrap().len();
    inject(DeviceFault::DropCompletions, 1, 0, 0).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    match device.kv_create(shape) {
        Err(Error::Unconfirmed { command: "KV_CREATE", .. }) => {}
        other => panic!("expected an unconfirmed KV_CREATE, got {other:?}"),
    }
    let after = device.kv_list().unwrap();
    assert_eq!(after.len(), before + 1, "applied exactly once");
    let created = after.iter().find(|s| s.id != l.seq.id).unwrap().id;
    device.kv_free(created).unwrap();

    // The temperature comes from the thermal model: idle 35 C, rising with
    // the compute units' load.
    let idle = device.health_info().unwrap().temperature_celsius.unwrap();
    let busy_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < busy_until {
        check(&device);
    }
    let warm = device.health_info().unwrap().temperature_celsius.unwrap();
    assert!((35..=75).contains(&idle) && warm > idle, "idle {idle} C, under load {warm} C");

    // Duplicated completions are discarded; every answer stays right.
    inject(DeviceFault::DuplicateCompletions, 3, 0, 0).unwrap();
    for _ in 0..4 {
        check(&device);
    }

    // A delayed completion arrives late but arrives.
    inject(DeviceFault::DelayCompletions, 1, 150_000, 0).unwrap();
    let start = Instant::now();
    check(&device);
    assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());

    // A missed doorbell: the command waits for a doorbell that does not
    // come, times out, and runs again on a new queue pair.
    inject(DeviceFault::DropDoorbells, 1, 0, 0).unwrap();
    let recoveries = device.recoveries();
    check(&device);
    assert_eq!(device.recoveries(), recoveries + 1);

    // A hung engine: commands wait out the hang (it is shorter than their
    // bound) and the heartbeat stops meanwhile.
    inject(DeviceFault::HangEngine, 0, 250_000, 0).unwrap();
    assert!(!device.is_alive(Duration::from_millis(120)), "no heartbeat while hung");
    check(&device);
    assert!(device.is_alive(Duration::from_millis(200)));

    // A stopped heartbeat alone: the device still answers.
    inject(DeviceFault::StopHeartbeat, 0, 300_000, 0).unwrap();
    assert!(!device.is_alive(Duration::from_millis(100)));
    check(&device);

    // A hung compute unit: its share waits for the other unit.
    inject(DeviceFault::HangUnit, 0, 200_000, 1).unwrap();
    check(&device);

    // Slow memory: the modelled and the real times stretch. The real time
    // before is the fastest of a few runs: on a busy machine (tests run in
    // parallel) one run can take several times its usual time, while the
    // slowed run is stretched threefold from whatever it took itself.
    let before = device.topk(&request).unwrap();
    let fastest_before = (0..4)
        .fold(before.device_ns, |fastest, _| fastest.min(device.topk(&request).unwrap().device_ns));
    inject(DeviceFault::SlowMemory, 0, 0, 300).unwrap();
    let slow = device.topk(&request).unwrap();
    assert_eq!(slow.indices, want);
    assert!(
        slow.model_ns as f64 >= 2.9 * before.model_ns as f64,
        "{} vs {}",
        slow.model_ns,
        before.model_ns
    );
    assert!(slow.device_ns > fastest_before, "{} vs {fastest_before}", slow.device_ns);
    assert!(device.health_info().unwrap().performance_degraded);
    inject(DeviceFault::ClearAll, 0, 0, 0).unwrap();

    // A compute unit dies: the other serves on; the warning log says so.
    inject(DeviceFault::KillUnit, 0, 0, 0).unwrap();
    for _ in 0..4 {
        check(&device);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let warnings = device.get_event_records(EventLog::Warning).unwrap();
        let module = warnings
            .records
            .iter()
            .any(|e| e.flags & 0x10 != 0 && matches!(e.kind, EventKind::MemoryModule { .. }));
        if module {
            break;
        }
        assert!(Instant::now() < deadline, "no Memory Module record for the dead unit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(device.health_info().unwrap().performance_degraded);

    // Bad fault fields are refused with Invalid Input and change nothing.
    for (fault, count, micros, target) in [
        (DeviceFault::DropCompletions, 0, 0, 0),
        (DeviceFault::KillUnit, 0, 0, 9),
        (DeviceFault::SlowMemory, 0, 0, 50),
    ] {
        let e = inject(fault, count, micros, target).unwrap_err();
        assert_eq!(e.return_code(), Some(pnm_protocol::ReturnCode::INVALID_INPUT), "{e}");
    }
    check(&device);

    // The device aborts mid-command: the command times out, the retry
    // finds no device (a typed error, within its bounds); the heartbeat
    // says it is gone. Restarted, the same handle reconnects by itself and
    // the device holds every row.
    inject(DeviceFault::Abort, 0, 0, 0).unwrap();
    let start = Instant::now();
    let e = device.topk(&request).unwrap_err();
    assert!(e.device_unresponsive(), "{e}");
    assert!(start.elapsed() < 4 * TIMEOUT + Duration::from_secs(2), "{:?}", start.elapsed());
    assert!(!device.is_alive(Duration::from_millis(100)));
    assert!(process.wait(Duration::from_secs(5)).is_some(), "the device process ended");
    let _process = DeviceProcess::start(region.path(), &["--allow-injection"]);
    let back = Instant::now();
    let seq = device.kv_sequence(l.seq.id).unwrap();
    assert!(back.elapsed() < Duration::from_secs(1), "reconnected in {:?}", back.elapsed());
    assert_eq!(seq.tokens, TOKENS);
    let request = TopkRequest::new(&seq, 0, 0, &q, 256);
    assert_eq!(device.topk(&request).unwrap().indices, want);
    let all: Vec<u32> = (0..TOKENS as u32).collect();
    let rows = device.gather(&seq, 0, 0, &all).unwrap();
    let bytes: Vec<u8> = l.keys.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(rows.keys, bytes, "every committed row as written");
}
