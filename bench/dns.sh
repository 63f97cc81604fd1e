#!/usr/bin/env bash
# DNS throughput and latency through usernet's gateway (cache on and off) against asking
# dnsmasq directly. Root; everything runs in namespaces this script creates and removes.
# Needs dnsmasq (dnsmasq-base) and python3. Usage: bench/dns.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-20000}
bin=target/release/usernet
[ -x "$bin" ] || cargo build --release -p usernet
h=undnsb-h-$$; g=undnsb-g-$$
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; ip netns del "$h" 2>/dev/null || true; ip netns del "$g" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$h"; ip netns add "$g"
ip -n "$h" link set lo up
ip -n "$g" tuntap add dev untap0 mode tap; ip -n "$g" link set untap0 mtu 1500
ip -n "$g" addr add 192.168.65.3/24 dev untap0; ip -n "$g" link set untap0 up; ip -n "$g" route add default via 192.168.65.1
ip netns exec "$h" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
    --listen-address=127.0.0.1 --port=5353 --user=root --pid-file= --address=/bench.test/10.1.1.1 --cache-size=10000 &
pids+=($!)
sleep 0.5
echo "dnsmasq directly (from its own namespace):"
ip netns exec "$h" python3 bench/dns_load.py 127.0.0.1 --port 5353 --count "$count"
for cache in 4096 0; do
    ip netns exec "$h" "$bin" tap --netns "/run/netns/$g" --tap untap0 --mtu 1500 --dns 127.0.0.1:5353 --dns-cache "$cache" 2>/dev/null &
    pids+=($!); sleep 0.5
    echo "through usernet, --dns-cache $cache:"
    ip netns exec "$g" python3 bench/dns_load.py 192.168.65.1 --count "$count"
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
done
