#!/usr/bin/env bash
# TCP throughput through the in-guest helper: iperf3 in a guest namespace whose TAP is
# carried by `usernet guest` over a UNIX socket to `usernet stream` in a host namespace,
# against iperf3 on that namespace's loopback (via the host alias). For comparison the
# same through `usernet tap` (the daemon serving the TAP itself), and the stream path
# with `--pcap` (to /dev/null: the hook's own cost; full frames, and a 96-byte snap
# length, to a file in a temporary directory). CPU seconds of each process from /proc. Root; runs in
# namespaces it creates and removes. Usage: bench/guest.sh [SECONDS] [MTU]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
mtu=${2:-1500}
bin=$PWD/target/release/usernet
[ -x "$bin" ] || cargo build --release -p usernet
h=ungb-h-$$; g=ungb-g-$$; dir=$(mktemp -d); pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$h" 2>/dev/null || true; ip netns del "$g" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$h"; ip -n "$h" link set lo up
ip netns exec "$h" iperf3 -s -B 127.0.0.1 -p 25201 >/dev/null 2>&1 &
pids+=($!)
sleep 0.3

cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

# run NAME: iperf3 upload then download from the guest namespace; prints one line.
run() {
    local name=$1 daemon=$2 helper=${3:-}
    local d0 h0=0 up down
    d0=$(cpu "$daemon"); [ -n "$helper" ] && h0=$(cpu "$helper")
    up=$(ip netns exec "$g" iperf3 -c 192.168.65.2 -p 25201 -t "$secs" -J | \
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))')
    down=$(ip netns exec "$g" iperf3 -c 192.168.65.2 -p 25201 -t "$secs" -R -J | \
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))')
    local dc hc=""
    dc=$(echo "$(cpu "$daemon") - $d0" | bc)
    [ -n "$helper" ] && hc=", helper CPU $(echo "$(cpu "$helper") - $h0" | bc) s"
    echo "$name (MTU $mtu, ${secs}s each way): upload $up Gbit/s, download $down Gbit/s; daemon CPU $dc s$hc"
}

guest_ns() {
    ip netns del "$g" 2>/dev/null || true
    ip netns add "$g"; ip -n "$g" link set lo up
}

# 1. usernet guest + usernet stream [--pcap]
for pcap in "" "--pcap /dev/null" "--pcap $dir/cap.pcap" "--pcap $dir/cap.pcap --pcap-snaplen 96"; do
    guest_ns
    # shellcheck disable=SC2086
    ip netns exec "$h" "$bin" stream --socket "$dir/s.sock" --mtu "$mtu" --no-dns $pcap 2>"$dir/d.log" &
    dpid=$!; pids+=($dpid)
    for _ in $(seq 50); do [ -S "$dir/s.sock" ] && break; sleep 0.1; done
    ip netns exec "$g" "$bin" guest --connect "unix:$dir/s.sock" --tap gt0 --mtu "$mtu" 2>"$dir/g.log" &
    gpid=$!; pids+=($gpid)
    for _ in $(seq 50); do ip -n "$g" link show gt0 >/dev/null 2>&1 && break; sleep 0.1; done
    ip -n "$g" addr add 192.168.65.3/24 dev gt0; ip -n "$g" route add default via 192.168.65.1
    name="guest helper -> stream${pcap:+ ${pcap//$dir\//}}"
    run "$name" "$dpid" "$gpid"
    [ -f "$dir/cap.pcap" ] && echo "  pcap file: $(stat -c %s "$dir/cap.pcap") bytes"
    kill "$gpid" "$dpid"; wait "$gpid" "$dpid" 2>/dev/null || true
    rm -f "$dir/cap.pcap"
done

# 2. usernet tap (no helper) at the same MTU
guest_ns
ip -n "$g" tuntap add dev untap0 mode tap; ip -n "$g" link set untap0 mtu "$mtu"
ip netns exec "$h" "$bin" tap --netns "/run/netns/$g" --tap untap0 --mtu "$mtu" --no-dns 2>"$dir/t.log" &
tpid=$!; pids+=($tpid)
sleep 0.3
ip -n "$g" addr add 192.168.65.3/24 dev untap0; ip -n "$g" link set untap0 up
ip -n "$g" route add default via 192.168.65.1
run "usernet tap (no helper)" "$tpid"
