#!/usr/bin/env python3
"""A client of QEMU's ivshmem server protocol (docs/specs/ivshmem-spec),
written from that spec alone, run against pnm-device's notification socket.
Checks the greeting, the shared-memory fd, the device's and our own vectors,
that host peers are not introduced to each other (the device is the hub:
PROTOCOL.md 6.2), and that ringing the device's vector 0 is accepted.
Prints 'N passed, M failed'.

Usage: ivshmem_client.py SOCKET REGION_SIZE"""
import os
import socket
import struct
import sys

path, region_size = sys.argv[1], int(sys.argv[2])
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    if not ok:
        print(f"FAIL {name} {detail}")


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def recv(s):
    data, fds, _, _ = socket.recv_fds(s, 8, 1)
    if len(data) != 8:
        raise SystemExit("server closed")
    return struct.unpack("<q", data)[0], (fds[0] if fds else None)


def greet(s):
    version, _ = recv(s)
    own, _ = recv(s)
    minus_one, shm = recv(s)
    return version, own, minus_one, shm


a = connect()
version, a_id, minus_one, shm = greet(a)
check("protocol version 0", version == 0)
check("own id is a positive peer id", a_id > 0)
check("-1 carries the shared memory", minus_one == -1 and shm is not None)
check("shared memory is the region", shm is not None and os.fstat(shm).st_size == region_size)
check("region size is a power of two (BAR2)", region_size & (region_size - 1) == 0)

# Then the device's vectors, then ours; the number of vectors is learned
# from our own id's messages, as the spec's clients do.
vectors = {}
while True:
    peer, fd = recv(a)
    check("vector messages carry an fd", fd is not None)
    vectors.setdefault(peer, []).append(fd)
    if peer == a_id and len(vectors[a_id]) == len(vectors.get(0, [])):
        break
check("the device is peer 0 with vectors", len(vectors.get(0, [])) > 0)
check("we have as many vectors as the device", len(vectors[a_id]) == len(vectors[0]))
check("no other host's vectors", set(vectors) == {0, a_id}, sorted(vectors))
n_vectors = len(vectors[a_id])

# Ringing the device's vector 0 (its wake vector) is a plain eventfd write.
os.write(vectors[0][0], struct.pack("<Q", 1))

# A second client gets its own id and the same greeting; the first hears
# nothing of its arrival or departure (host peers only talk to the device).
b = connect()
_, b_id, _, _ = greet(b)
check("the second client gets another id", b_id not in (0, a_id))
b_vectors = {}
for _ in range(2 * n_vectors):
    peer, fd = recv(b)
    b_vectors.setdefault(peer, []).append(fd)
check("the second client gets the device's vectors and its own", set(b_vectors) == {0, b_id}, sorted(b_vectors))
b.close()
a.settimeout(0.3)
try:
    data = a.recv(8)
    check("nothing is announced to other hosts", False, data)
except socket.timeout:
    check("nothing is announced to other hosts", True)
a.close()

failed = results.count(False)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
