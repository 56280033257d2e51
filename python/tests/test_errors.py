"""Errors as typed Python exceptions, bounded waits, the GIL released while
waiting, and many threads at once."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

import cxl_pnm
from conftest import DeviceProcess
from reference import coarse, exact_topk


def small_sequence(device, tokens=2000, d=64):
    rng = np.random.default_rng(20)
    k32 = coarse(rng, (1, 2, tokens, d))
    seq = device.kv_create(1, 2, d, "f32")
    seq.append(k32, k32)
    return seq, k32


def test_bad_requests_are_invalid_request_errors(device):
    seq, k32 = small_sequence(device)
    q = np.ones((4, 64), np.float32)
    cases = [
        lambda: seq.append(k32[:, :1], k32),  # K and V shapes differ
        lambda: seq.append(k32.astype(np.int32), k32.astype(np.int32)),  # not floats
        lambda: seq.append(k32[..., :32], k32[..., :32]),  # wrong head_dim
        lambda: seq.topk(0, 0, np.ones((4, 32), np.float32), 10),  # query head_dim
        lambda: seq.topk(0, 0, q.astype(np.int64), 10),  # query dtype
        lambda: seq.topk(0, 0, q, 10, aggregation="median"),
        lambda: seq.topk(0, 0, q, 1 << 20),  # beyond the device's max_k
        lambda: device.kv_create(1, 1, 64, "int8"),
        lambda: device.kv_create(0, 1, 64, "f32"),
        lambda: seq.topk(5, 0, q, 10),  # no layer 5
        lambda: seq.gather(0, 2, [0]),  # no KV head 2
    ]
    for case in cases:
        with pytest.raises(cxl_pnm.InvalidRequestError) as error:
            case()
        assert isinstance(error.value, ValueError) and error.value.return_code is None
    assert seq.tokens == 2000  # nothing was appended


def test_device_refusals_carry_the_return_code(device):
    seq, _ = small_sequence(device)
    with pytest.raises(cxl_pnm.CommandError) as error:
        seq.gather(0, 0, [5, 2000])  # no token 2000
    assert error.value.return_code == 0x02 and "Invalid Input" in error.value.return_code_name
    with pytest.raises(cxl_pnm.CommandError) as error:
        device.sequence(4242)
    assert error.value.return_code == 0x0E


def test_out_of_device_dram_is_refused_and_the_append_rolled_back():
    device = cxl_pnm.Device.embedded("64MiB")
    seq = device.kv_create(1, 1, 128, "f32")
    rows = np.zeros((1, 1, 200_000, 128), np.float32)  # 200 MB of K and V
    with pytest.raises(cxl_pnm.CommandError) as error:
        seq.append(rows, rows)
    assert error.value.return_code == 0x19 or "exhausted" in str(error.value).lower()
    seq.refresh()
    assert seq.tokens == 0
    seq.append(rows[:, :, :1000], rows[:, :, :1000])  # and it still serves
    assert seq.tokens == 1000


def test_opening_what_is_not_a_device(tmp_path):
    with pytest.raises(cxl_pnm.DeviceOpenError) as error:
        cxl_pnm.Device(tmp_path / "missing")
    assert isinstance(error.value, OSError)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 65536)
    with pytest.raises(cxl_pnm.DeviceOpenError):
        cxl_pnm.Device(junk)


def test_a_stopped_device_times_out_within_the_bound_and_the_gil_is_free_meanwhile():
    process = DeviceProcess()
    try:
        device = process.open(command_timeout=0.5, mailbox_timeout=0.5)
        seq, k32 = small_sequence(device)
        q = coarse(np.random.default_rng(21), (2, 64))
        process.signal(signal.SIGSTOP)
        outcome = {}

        def waiter():
            start = time.monotonic()
            try:
                seq.topk(0, 1, q, 10)
                outcome["error"] = None
            except cxl_pnm.PnmError as e:
                outcome["error"] = e
            outcome["seconds"] = time.monotonic() - start

        thread = threading.Thread(target=waiter)
        thread.start()
        spins = 0
        while thread.is_alive():
            spins += 1  # Python keeps running while the call waits on the device
        thread.join()
        assert isinstance(outcome["error"], cxl_pnm.DeviceTimeoutError)
        assert isinstance(outcome["error"], TimeoutError)
        # Bounded: the command's timeout, then replacing its queue pair
        # (mailbox commands, each bounded) fails too.
        assert outcome["seconds"] < 2.5, outcome
        assert spins > 1000
        process.signal(signal.SIGCONT)
        top = seq.topk(0, 1, q, 10)  # recovers once the device runs again
        np.testing.assert_array_equal(top.indices, exact_topk(k32[0, 1], q, 10)[0])
        del seq, device
    finally:
        process.close()


def test_poisoned_rows_raise_media_error_or_are_skipped():
    process = DeviceProcess("--allow-injection")
    try:
        device = process.open()
        seq, k32 = small_sequence(device)
        token = 1234
        [(dpa, lines)] = seq.row_ranges(0, 0, token, token + 1)
        device.inject_poison(dpa)
        q = np.ones((1, 64), np.float32)
        with pytest.raises(cxl_pnm.MediaError) as error:
            seq.topk(0, 0, q, 10)
        e = error.value
        assert e.return_code == 0x7F00 and e.first_token <= token < e.first_token + e.tokens
        assert e.dpa <= dpa
        assert any(r["dpa"] == dpa for r in device.poison_list()["records"])
        top = seq.topk(0, 0, q, 10, skip_bad_rows=True)
        assert top.skipped >= 1 and token not in top.indices
        seq.topk(0, 1, q, 10)  # the other head's rows are fine
        del seq, device
    finally:
        process.close()


def test_many_threads_on_one_device_all_answer_correctly(device):
    rng = np.random.default_rng(22)
    seq, k32 = small_sequence(device, tokens=4000)
    queries = [coarse(rng, (2, 64)) for _ in range(16)]
    expected = [exact_topk(k32[0, i % 2], q, 50)[0] for i, q in enumerate(queries)]
    failures = []

    def worker(offset):
        for rep in range(10):
            i = (offset + rep) % len(queries)
            top = seq.topk_gather(0, i % 2, queries[i], 50)
            if not np.array_equal(top.indices, expected[i]) or not np.array_equal(
                top.keys, k32[0, i % 2][expected[i]]
            ):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
