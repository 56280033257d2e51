#!/usr/bin/env python3
"""Many processes, one device: a load test with every answer checked.

N concurrent `pnmctl --json topk` processes (each opens the device, takes
the Mailbox Lock for its set-up commands, creates a queue pair and DMA
buffers, runs one Top-K and tears everything down) against one
`pnm-device`, for a fixed time; every answer is compared with NumPy's exact
Top-K over the same f16 keys. First one process alone, for the baseline,
then N at once. Prints one JSON report; exits 1 on any error, wrong answer
or hang (a pnmctl that does not finish within --hang-seconds).

Usage:
  load_sharing.py --pnmctl target/release/pnmctl --pnm-device target/release/pnm-device \\
      [--procs 32] [--seconds 60] [--alone-seconds 10] [--device REGION]

Without --device it starts its own device on a temporary region.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HEADS, TOKENS, DIM, K, QUERIES = 4, 8192, 64, 32, 16


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pnmctl", required=True)
    p.add_argument("--pnm-device", required=True)
    p.add_argument("--device", help="region of a running device (default: start one)")
    p.add_argument("--procs", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--alone-seconds", type=float, default=10)
    p.add_argument("--hang-seconds", type=float, default=30)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


def exact_topk(keys32, q, k):
    """NumPy's exact Top-K of one stream: q.k in f64, ties to the lower index."""
    scores = keys32.astype(np.float64) @ q.astype(np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k], scores


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies = []
        self.errors, self.wrong, self.hangs = [], [], []

    def report(self, seconds):
        lat = np.array(sorted(self.latencies)) * 1e3 if self.latencies else np.array([0.0])
        return {
            "commands": len(self.latencies),
            "errors": len(self.errors),
            "wrong": len(self.wrong),
            "hangs": len(self.hangs),
            "throughput_per_s": round(len(self.latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "first_problems": (self.errors + self.wrong + self.hangs)[:5],
        }


def worker(args, region, seq, cases, deadline, tally, start_at):
    i = start_at
    while time.monotonic() < deadline:
        head, qpath, want, scores = cases[i % len(cases)]
        i += 1
        cmd = [args.pnmctl, "--device", region, "--json", "topk", "--seq", str(seq),
               "--layer", "0", "--head", str(head), "--query", qpath, "-k", str(K)]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hang_seconds)
        except subprocess.TimeoutExpired:
            with tally.lock:
                tally.hangs.append(f"hang: {' '.join(cmd[3:])}")
            continue
        elapsed = time.monotonic() - t0
        if p.returncode != 0:
            with tally.lock:
                tally.errors.append(p.stderr.strip()[:300])
            continue
        try:
            got = json.loads(p.stdout)
            idx = np.array(got["indices"], dtype=np.int64)
            got_scores = np.array(got["scores"], dtype=np.float64)
        except (ValueError, KeyError) as e:
            with tally.lock:
                tally.wrong.append(f"malformed output: {e}: {p.stdout[:200]}")
            continue
        kth = scores[want[-1]]
        returned = set(idx.tolist())
        missing = [int(t) for t in want if t not in returned and abs(scores[t] - kth) > 1e-3]
        ok = (len(idx) == K and not missing
              and np.allclose(got_scores, scores[idx], rtol=1e-4, atol=1e-3))
        with tally.lock:
            if ok:
                tally.latencies.append(elapsed)
            else:
                tally.wrong.append(f"head {head} {qpath}: missing {missing[:5]}")


def phase(args, region, seq, cases, procs, seconds):
    tally = Tally()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=worker, args=(args, region, seq, cases, deadline, tally, n * 7))
               for n in range(procs)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = tally.report(time.monotonic() - t0)
    report["procs"] = procs
    return report


def wait_running(pnmctl, region, bound=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if subprocess.run([pnmctl, "--device", region, "status"], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"the device on {region} did not start")


def main():
    args = parse()
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="cxl-pnm-load-")
    device = None
    region = args.device
    if region is None:
        region = f"/dev/shm/cxl-pnm-load-{os.getpid()}"
        device = subprocess.Popen([args.pnm_device, "--path", region, "--size", "256MiB"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_running(args.pnmctl, region)
    try:
        keys = rng.standard_normal((1, HEADS, TOKENS, DIM)).astype(np.float16)
        values = rng.standard_normal((1, HEADS, TOKENS, DIM)).astype(np.float16)
        kp, vp = os.path.join(work, "k.npy"), os.path.join(work, "v.npy")
        np.save(kp, keys)
        np.save(vp, values)
        p = subprocess.run([args.pnmctl, "--device", region, "--json", "kv", "load", "--keys", kp, "--values", vp],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise SystemExit(f"kv load failed: {p.stderr}")
        seq = json.loads(p.stdout)["id"]
        keys32 = keys.astype(np.float32)
        cases = []
        for n in range(QUERIES):
            q = rng.standard_normal(DIM).astype(np.float32)
            qp = os.path.join(work, f"q{n}.npy")
            np.save(qp, q)
            head = n % HEADS
            want, scores = exact_topk(keys32[0, head], q, K)
            cases.append((head, qp, want, scores))
        alone = phase(args, region, seq, cases, 1, args.alone_seconds)
        shared = phase(args, region, seq, cases, args.procs, args.seconds)
        status = json.loads(subprocess.run([args.pnmctl, "--device", region, "--json", "status"],
                                           capture_output=True, text=True).stdout)
        report = {
            "sequence": {"heads": HEADS, "tokens": TOKENS, "head_dim": DIM, "dtype": "f16", "k": K},
            "alone": alone,
            "shared": shared,
            "throughput_vs_alone": round(shared["throughput_per_s"] / max(alone["throughput_per_s"], 1e-9), 2),
            "p50_vs_alone": round(shared["p50_ms"] / max(alone["p50_ms"], 1e-9), 2),
            "mailbox_lock_breaks": status.get("mailbox_lock_breaks"),
            "device_state": status.get("state"),
        }
        print(json.dumps(report, indent=2))
        bad = sum(r[f] for r in (alone, shared) for f in ("errors", "wrong", "hangs"))
        failed = bad + (0 if status.get("state") == "running" else 1)
        print(f"{alone['commands'] + shared['commands']} passed, {failed} failed")
        return 1 if failed else 0
    finally:
        if device is not None:
            device.terminate()
            device.wait(timeout=10)
            for path in (region, region + ".sock"):
                if os.path.exists(path):
                    os.remove(path)
        for name in os.listdir(work):
            os.remove(os.path.join(work, name))
        os.rmdir(work)


if __name__ == "__main__":
    sys.exit(main())
