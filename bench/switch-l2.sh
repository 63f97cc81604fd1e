#!/usr/bin/env bash
# Guest-to-guest frames per second through the virtual switch: two u16 LE clients on one
# `usernet serve` listener, A sending COUNT 1514-byte frames to B (bench/switch_l2.py),
# three runs. Frames never leave the daemon; it runs in a namespace this script creates
# and removes. Root. Usage: bench/switch-l2.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-200000}
bin=target/release/usernet
[ -x "$bin" ] || cargo build --release -p usernet
ns=unl2-$$; sock=/tmp/unl2-$$.sock; pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; rm -f "$sock"; }
trap cleanup EXIT
ip netns add "$ns"; ip -n "$ns" link set lo up
ip netns exec "$ns" "$bin" serve --no-dns --listen "unix:$sock,framing=u16le" 2>/dev/null &
pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
for _ in 1 2 3; do timeout 120 python3 bench/switch_l2.py "$sock" "$count"; done
