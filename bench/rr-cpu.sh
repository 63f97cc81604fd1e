#!/usr/bin/env bash
# CPU time per TCP round trip, usernet (with its default adaptive polling, and with
# `--poll-max-us 0`) against slirp4netns: a Python ping-pong of COUNT 64-byte round trips
# through each backend to an echo server on the host side's loopback, while
# `perf stat -e task-clock` watches the backend's process. Root; runs in namespaces it
# creates and removes. Usage: bench/rr-cpu.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-10000}
bin=target/release/usernet
[ -x "$bin" ] || cargo build --release -p usernet
u=unrr-u-$$; z=unrr-z-$$; s=unrr-s-$$; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; for n in "$u" "$z" "$s"; do ip netns del "$n" 2>/dev/null || true; done; }
trap cleanup EXIT
for n in "$u" "$z" "$s"; do ip netns add "$n"; ip -n "$n" link set lo up; done
for n in "$u" "$z"; do
    ip -n "$n" tuntap add dev untap0 mode tap; ip -n "$n" link set untap0 mtu 65520
done
"$bin" tap --netns "/run/netns/$u" --tap untap0 --subnet 10.0.2.0/24 --gateway-ip 10.0.2.2 --host-ip 10.0.2.2 --no-dns 2>/dev/null &
upid=$!; pids+=($upid)
"$bin" tap --netns "/run/netns/$z" --tap untap0 --subnet 10.0.2.0/24 --gateway-ip 10.0.2.2 --host-ip 10.0.2.2 --no-dns --poll-max-us 0 2>/dev/null &
zpid=$!; pids+=($zpid)
sleep 0.3
for n in "$u" "$z"; do
    ip -n "$n" addr add 10.0.2.100/24 dev untap0; ip -n "$n" link set untap0 up; ip -n "$n" route add default via 10.0.2.2
done
slirp4netns --configure --mtu=65520 --disable-dns --netns-type=path "/run/netns/$s" tap0 >/dev/null 2>&1 &
spid=$!; pids+=($spid)
python3 -c '
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(("127.0.0.1", 25415)); l.listen(16)
def h(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (d := c.recv(65536)):
        c.sendall(d)
while True:
    c, _ = l.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()' &
pids+=($!)
sleep 1
rr='
import socket, sys, time
s = socket.create_connection(("10.0.2.2", 25415)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[1]); lat = []
for _ in range(n):
    t = time.perf_counter(); s.sendall(b"x" * 64); got = 0
    while got < 64: got += len(s.recv(64 - got))
    lat.append(time.perf_counter() - t)
lat.sort(); print(f"p50 {lat[n // 2] * 1e6:.1f} us")'
for b in "slirp4netns $spid $s" "usernet $upid $u" "usernet-nopoll $zpid $z"; do
    set -- $b
    perf stat -e task-clock,context-switches -p "$2" -o "/tmp/unrr-$$-$1" &
    perf=$!
    sleep 0.2
    lat=$(ip netns exec "$3" python3 -c "$rr" "$count")
    kill -INT "$perf"; wait "$perf" 2>/dev/null || true
    ms=$(awk '/task-clock/ {print $1}' "/tmp/unrr-$$-$1")
    cs=$(awk '/context-switches/ {print $1}' "/tmp/unrr-$$-$1")
    python3 -c "import sys; ms, cs, n = float(sys.argv[1].replace(',', '')), int(sys.argv[2].replace(',', '')), int(sys.argv[3]); print(f'{sys.argv[4]:15} {ms * 1000 / n:6.1f} us CPU/round trip  {cs / n:4.2f} switches/round trip  ' + sys.argv[5])" "$ms" "$cs" "$count" "$1" "$lat"
    rm -f "/tmp/unrr-$$-$1"
done
