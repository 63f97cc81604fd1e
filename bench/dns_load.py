#!/usr/bin/env python3
"""DNS load client: N queries over UDP, `--parallel` in flight at a time; prints queries
per second and p50/p99 latency. Used by bench/dns.sh inside a test namespace."""
import argparse, random, socket, struct, time, select

def query(qid, name):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)

ap = argparse.ArgumentParser()
ap.add_argument("server"); ap.add_argument("--port", type=int, default=53)
ap.add_argument("--count", type=int, default=20000); ap.add_argument("--parallel", type=int, default=16)
ap.add_argument("--names", type=int, default=100, help="distinct names queried (cache hits after the first round)")
a = ap.parse_args()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
sent = {}; lat = []; next_id = 0; done = 0; lost = 0
t0 = time.perf_counter()
while done + lost < a.count:
    while len(sent) < a.parallel and next_id < a.count:
        qid = next_id & 0xffff
        s.sendto(query(qid, f"n{next_id % a.names}.bench.test"), (a.server, a.port))
        sent[qid] = time.perf_counter(); next_id += 1
    r, _, _ = select.select([s], [], [], 1.0)
    if not r:
        lost += len(sent); sent.clear(); continue
    while True:
        try:
            data = s.recv(4096)
        except BlockingIOError:
            break
        qid = struct.unpack(">H", data[:2])[0]
        if qid in sent:
            lat.append(time.perf_counter() - sent.pop(qid)); done += 1
elapsed = time.perf_counter() - t0
lat.sort()
print(f"queries={done} lost={lost} qps={done/elapsed:.0f} p50_us={lat[len(lat)//2]*1e6:.0f} p99_us={lat[int(len(lat)*0.99)]*1e6:.0f}")
