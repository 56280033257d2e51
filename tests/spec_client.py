#!/usr/bin/env python3
"""An independent CXL mailbox client written from the CXL 3.1 specification
(section 8.2.8), knowing nothing of cxl-pnm's code: it opens a region file,
walks the Device Capabilities Array, and runs mailbox commands, right and
wrong, checking that the answers are spec-conformant.

Usage: spec_client.py REGION_PATH [EXPECT...]
      (exit 0 and 'N passed, 0 failed' on success)

EXPECT, what a test injected beforehand, to be found through spec commands:
  poison=DPA:LINES:SOURCE   a Get Poison List record (source 3 = injected)
  scan=DPA                  Scan Media finds the line (then listed, source 2,
                            and a General Media record in the failure log)
"""
import mmap
import os
import struct
import sys
import time

CEL_UUID = bytes.fromhex("0da9c0b5bf414b788f7996b1623b3f17")


class Mailbox:
    def __init__(self, mem, base):
        self.mem, self.base = mem, base
        caps = self.u32(0x00)
        self.payload_size = 1 << (caps & 0x1F)
        assert 256 <= self.payload_size <= 1 << 20, caps

    def u32(self, off):
        return struct.unpack_from("<I", self.mem, self.base + off)[0]

    def u64(self, off):
        return struct.unpack_from("<Q", self.mem, self.base + off)[0]

    def run(self, opcode, payload=b"", length=None, timeout=2.0):
        if self.u32(0x04) & 1:
            raise RuntimeError("mailbox busy")
        self.mem[self.base + 0x20:self.base + 0x20 + len(payload)] = payload
        length = len(payload) if length is None else length
        struct.pack_into("<Q", self.mem, self.base + 0x08, opcode | (length << 16))
        struct.pack_into("<I", self.mem, self.base + 0x04, self.u32(0x04) | 1)
        deadline = time.monotonic() + timeout
        while self.u32(0x04) & 1:
            if time.monotonic() > deadline:
                raise TimeoutError(hex(opcode))
            time.sleep(0.0001)
        status = self.u64(0x10)
        rc = (status >> 32) & 0xFFFF
        out_len = (self.u64(0x08) >> 16) & 0x1FFFFF
        assert out_len <= self.payload_size, out_len
        return rc, bytes(self.mem[self.base + 0x20:self.base + 0x20 + out_len])


def poison_list(mb, dpa, lines):
    """Get Poison List (8.2.9.9.4.1): (flags, [(dpa, lines, source)])."""
    rc, out = mb.run(0x4300, struct.pack("<QQ", dpa, lines))
    if rc != 0:
        return rc, None
    flags, count = out[0], struct.unpack_from("<H", out, 0x0A)[0]
    assert len(out) == 0x20 + 16 * count, (len(out), count)
    records = []
    for i in range(count):
        addr, length = struct.unpack_from("<QI", out, 0x20 + 16 * i)
        records.append((addr & ~0x3F, length, addr & 0x7))
    return rc, (flags, records)


def media_checks(mb, mem, capacity, expect, check):
    """Poison list and Scan Media (8.2.9.9.4), and what a test injected."""
    rc, ident = mb.run(0x4000)
    max_records = int.from_bytes(ident[0x3C:0x3F], "little")
    check("identify: a poison list of at least one record", max_records >= 1)
    check("identify: scan media supported", ident[0x41] & 0x2)
    lines = capacity // 64
    rc, got = poison_list(mb, 0, lines)
    check("get poison list over the capacity", rc == 0)
    records = got[1] if got else []
    check("poison list fits its maximum", len(records) <= max_records)
    rc, _ = mb.run(0x4300, struct.pack("<QQ", 8, 1))
    check("unaligned poison list address -> Invalid Input (02h)", rc == 0x02)
    rc, _ = mb.run(0x4300, struct.pack("<QQ", 0, lines * 4096))
    check("poison list past the media -> Invalid Physical Address (0Fh)", rc == 0x0F)
    for e in expect:
        kind, _, value = e.partition("=")
        if kind == "poison":
            dpa, n, source = (int(v, 0) for v in value.split(":"))
            check(f"injected poison {dpa:#x}+{n} listed (source {source})", (dpa, n, source) in records)

    rc, out = mb.run(0x4303, struct.pack("<QQ", 0, lines))
    check("scan media capabilities", rc == 0 and len(out) == 4)
    rc, _ = mb.run(0x4304, struct.pack("<QQB", 0, lines, 0))
    check("scan media starts in the background (01h)", rc == 0x01)
    deadline = time.monotonic() + 120
    while True:
        status, bg = mb.u64(0x10), mb.u64(0x18)
        if not status & 1:
            break
        check("a second background command -> Busy (06h)", mb.run(0x4304, struct.pack("<QQB", 0, 1, 0))[0] == 0x06)
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    check("scan media finished", not mb.u64(0x10) & 1)
    check("background status: scan media, 100%, success",
          bg & 0xFFFF == 0x4304 and (bg >> 16) & 0x7F == 100 and (bg >> 32) & 0xFFFF == 0)
    found = []
    while True:
        rc, out = mb.run(0x4305)
        check("get scan media results", rc == 0 and len(out) >= 0x20)
        count = struct.unpack_from("<H", out, 0x12)[0]
        for i in range(count):
            addr, length = struct.unpack_from("<QI", out, 0x20 + 16 * i)
            found.append((addr & ~0x3F, length, addr & 0x7))
        if not out[0x10] & 1 or count == 0:
            break
    scans = [int(e.partition("=")[2], 0) for e in expect if e.startswith("scan=")]
    for dpa in scans:
        check(f"scan found {dpa:#x} (source internal)", (dpa, 1, 2) in found)
    if scans:
        rc, got = poison_list(mb, 0, lines)
        listed = got[1] if got else []
        for dpa in scans:
            check(f"scan's {dpa:#x} now on the poison list",
                  any(d <= dpa < d + 64 * n for d, n, _ in listed))
        rc, out = mb.run(0x0100, bytes([2]))
        count = struct.unpack_from("<H", out, 0x14)[0]
        media = [struct.unpack_from("<Q", out, 0x20 + 128 * i + 0x30)[0] & ~0x3F
                 for i in range(count)
                 if out[0x20 + 128 * i:0x20 + 128 * i + 16] == bytes.fromhex("fbcd0a77c260417f85a9088b1621eba6")]
        for dpa in scans:
            check(f"general media record for {dpa:#x} in the failure log", dpa in media)


def main(path, expect=()):
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    checks = []

    def check(name, cond):
        checks.append((name, bool(cond)))
        if not cond:
            print("FAIL", name)

    low, _high = struct.unpack_from("<QQ", mem, 0)
    check("array id 0", low & 0xFFFF == 0)
    check("array version 1", (low >> 16) & 0xFF == 1)
    check("memory device type", (low >> 24) & 0xF == 1)
    count = (low >> 32) & 0xFFFF
    caps = {}
    for i in range(count):
        lo, hi = struct.unpack_from("<QQ", mem, 0x10 * (i + 1))
        caps[lo & 0xFFFF] = (lo >> 32, hi & 0xFFFFFFFF, (lo >> 16) & 0xFF)
    check("has device status", 0x0001 in caps)
    check("has primary mailbox", 0x0002 in caps)
    check("has memory device status", 0x4000 in caps)
    check("has a vendor capability", any(cid >= 0x8000 for cid in caps))
    memdev = struct.unpack_from("<Q", mem, caps[0x4000][0])[0]
    check("media ready", (memdev >> 2) & 3 == 1)
    check("mailbox ready", memdev & (1 << 4))

    mb = Mailbox(mem, caps[0x0002][0])
    check("mailbox fits its capability", 0x20 + mb.payload_size <= caps[0x0002][1])

    rc, out = mb.run(0x4000)
    check("identify succeeds", rc == 0 and len(out) >= 0x43)
    total, volatile, persistent = struct.unpack_from("<QQQ", out, 0x10)
    check("identify capacities", total == volatile + persistent)

    rc, out = mb.run(0x4200)
    check("health info", rc == 0 and len(out) == 0x12)

    rc, out = mb.run(0x0300)
    check("get timestamp", rc == 0 and len(out) == 8)
    rc, _ = mb.run(0x0301, struct.pack("<Q", 123_000_000_000))
    check("set timestamp", rc == 0)
    rc, out = mb.run(0x0300)
    check("timestamp advances from set value", rc == 0 and struct.unpack("<Q", out)[0] >= 123_000_000_000)

    rc, out = mb.run(0x0400)
    check("supported logs", rc == 0)
    entries = struct.unpack_from("<H", out, 0)[0]
    logs = {out[8 + 20 * i:24 + 20 * i]: struct.unpack_from("<I", out, 24 + 20 * i)[0] for i in range(entries)}
    check("CEL listed", CEL_UUID in logs)
    cel_size = logs.get(CEL_UUID, 0)
    rc, cel = mb.run(0x0401, CEL_UUID + struct.pack("<II", 0, cel_size))
    check("get CEL", rc == 0 and len(cel) == cel_size)
    opcodes = {struct.unpack_from("<H", cel, i)[0] for i in range(0, len(cel), 4)}
    check("CEL lists what we used", {0x4000, 0x4200, 0x0300, 0x0301, 0x0400, 0x0401} <= opcodes)
    for op in sorted(opcodes):
        # Commands that take input, and vendor commands (their inputs are
        # not in the CXL specification), are exercised separately.
        if op in (0x0100, 0x0101, 0x0103, 0x0301, 0x0401, 0x4300, 0x4301, 0x4302, 0x4303,
                  0x4304) or op >= 0xC000:
            continue
        rc, _ = mb.run(op)
        check(f"CEL opcode {op:04X}h is served", rc == 0)

    # Event logs (8.2.9.2): Get Event Records per log, records of 128 bytes
    # with nonzero handles and the log's severity, the Event Status
    # register (Device Status capability, offset 0) agreeing, and clearing.
    status_base = caps[0x0001][0]
    seen = {}
    for log in range(4):
        rc, out = mb.run(0x0100, bytes([log]))
        check(f"get event records, log {log}", rc == 0 and len(out) >= 0x20)
        count = struct.unpack_from("<H", out, 0x14)[0]
        check(f"log {log}: record count matches the length", len(out) == 0x20 + 128 * count)
        recs = [out[0x20 + 128 * i:0x20 + 128 * (i + 1)] for i in range(count)]
        check(f"log {log}: records are 128 bytes", all(r[0x10] == 0x80 for r in recs))
        check(f"log {log}: handles are nonzero", all(struct.unpack_from("<H", r, 0x14)[0] for r in recs))
        check(f"log {log}: severity is the log's", all(r[0x11] & 3 == log for r in recs))
        seen[log] = recs
    event_status = struct.unpack_from("<I", mem, status_base)[0]
    check("event status bits = non-empty logs",
          all(bool(event_status >> log & 1) == bool(seen[log]) for log in range(4)))
    rc, _ = mb.run(0x0100, bytes([5]))
    check("get event records of log 5 -> Invalid Input (02h)", rc == 0x02)
    rc, _ = mb.run(0x0101, bytes([0, 0, 1, 0, 0, 0]) + struct.pack("<H", 0))
    check("clear handle 0 -> Invalid Handle (0Eh)", rc == 0x0E)
    rc, _ = mb.run(0x0101, bytes([0, 0, 2, 0, 0, 0]) + struct.pack("<H", 1))
    check("clear with fewer handles than it says -> 16h", rc == 0x16)
    for log in range(4):
        rc, _ = mb.run(0x0101, bytes([log, 1, 0, 0, 0, 0]))
        check(f"clear all events, log {log}", rc == 0)
        rc, out = mb.run(0x0100, bytes([log]))
        check(f"log {log} empty after clear all", rc == 0 and struct.unpack_from("<H", out, 0x14)[0] == 0)
    check("event status clear", struct.unpack_from("<I", mem, status_base)[0] & 0xF == 0)
    # Event Interrupt Policy (8.2.9.2.4/5): a byte per log, [1:0] mode, [7:4] vector.
    rc, out = mb.run(0x0102)
    check("get event interrupt policy", rc == 0 and len(out) >= 4)
    rc, _ = mb.run(0x0103, bytes([0x21, 0, 0, 0]))
    check("set informational log to MSI/MSI-X vector 2", rc == 0)
    rc, out = mb.run(0x0102)
    check("the policy reads back", rc == 0 and out[0] == 0x21)
    rc, _ = mb.run(0x0103, bytes([0x03, 0, 0, 0]))
    check("reserved interrupt mode -> Invalid Input (02h)", rc == 0x02)
    rc, _ = mb.run(0x0103, bytes([0, 0, 0]))
    check("short policy -> 16h", rc == 0x16)
    rc, _ = mb.run(0x0103, bytes(4))
    check("policy back to none", rc == 0)

    # Wrong commands: spec return codes, and the device keeps serving.
    rc, _ = mb.run(0x0001)
    check("unknown opcode -> Unsupported (03h)", rc == 0x03)
    rc, _ = mb.run(0x4306, b"\0" * 16)
    check("unlisted opcode -> Unsupported (03h)", rc == 0x03)
    rc, _ = mb.run(0x4000, b"\0" * 4)
    check("identify with input -> Invalid Payload Length (16h)", rc == 0x16)
    rc, _ = mb.run(0x0301, b"\0" * 3)
    check("short set timestamp -> 16h", rc == 0x16)
    rc, _ = mb.run(0x0300, length=mb.payload_size + 1)
    check("length beyond payload -> 16h", rc == 0x16)
    rc, _ = mb.run(0x0401, bytes(16) + struct.pack("<II", 0, 4))
    check("unknown log -> Invalid Log (17h)", rc == 0x17)
    rc, _ = mb.run(0x0401, CEL_UUID + struct.pack("<II", cel_size, 4))
    check("read past the log -> Invalid Input (02h)", rc == 0x02)
    rc, _ = mb.run(0x4000)
    check("still serving", rc == 0)

    media_checks(mb, mem, total * (256 << 20), expect, check)

    failed = sum(1 for _, ok in checks if not ok)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
