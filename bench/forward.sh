#!/usr/bin/env bash
# Port-forward throughput and connection rate: a client on the host side's loopback,
# through each backend's forward, to servers in a network namespace. usernet (-p),
# pasta (-t) and slirp4netns (add_hostfwd), side by side. Root; everything runs in
# namespaces this script creates and removes. Needs iperf3, python3, passt, slirp4netns.
# Usage: bench/forward.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
bin=target/release/usernet
[ -x "$bin" ] || cargo build --release -p usernet
pids=(); nss=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "${nss[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    rm -f /tmp/unfwd-$$.sock
}
trap cleanup EXIT
h=unfwd-h-$$; nss+=("$h"); ip netns add "$h"; ip -n "$h" link set lo up
# pasta wants a routable interface where it runs: a veth into a namespace of ours, with a
# default route through it (nothing in this benchmark is sent there).
x=unfwd-x-$$; nss+=("$x"); ip netns add "$x"
ip link add unfwdh netns "$h" type veth peer name unfwdx netns "$x"
ip -n "$h" addr add 10.99.0.1/24 dev unfwdh; ip -n "$x" addr add 10.99.0.2/24 dev unfwdx
ip -n "$h" link set unfwdh up; ip -n "$x" link set unfwdx up; ip -n "$h" route add default via 10.99.0.2

conn_rate() { # host port
    ip netns exec "$h" python3 - "$1" <<'PY'
import socket, sys, time
port = int(sys.argv[1]); n = 0; t0 = time.time()
while n < 2000:
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"x"); s.recv(1); s.close(); n += 1
print(f"{n / (time.time() - t0):.0f}")
PY
}

guest_servers() { # netns
    ip netns exec "$1" iperf3 -s -p 5201 >/dev/null 2>&1 & pids+=($!)
    ip netns exec "$1" python3 -c '
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(("0.0.0.0", 7)); l.listen(512)
def h(c):
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = l.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()' & pids+=($!)
    sleep 0.5
}

measure() { # name
    local up down cps
    up=$(ip netns exec "$h" iperf3 -c 127.0.0.1 -p 15201 -t "$secs" -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))')
    down=$(ip netns exec "$h" iperf3 -c 127.0.0.1 -p 15201 -t "$secs" -R -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))')
    cps=$(conn_rate 15007)
    printf "%-12s %10s %12s %8s\n" "$1" "$up" "$down" "$cps"
}

printf "%-12s %10s %12s %8s\n" backend "in Gbit/s" "out Gbit/s" "conn/s"

# usernet: the daemon in the host namespace, forwards set through its control API.
g=unfwd-u-$$; nss+=("$g"); ip netns add "$g"; ip -n "$g" link set lo up
ip -n "$g" tuntap add dev untap0 mode tap; ip -n "$g" link set untap0 mtu 65520
ip -n "$g" addr add 192.168.65.3/24 dev untap0; ip -n "$g" link set untap0 up; ip -n "$g" route add default via 192.168.65.1
guest_servers "$g"
# The guest is configured by hand (no DHCP lease), so the forwards name its address.
ip netns exec "$h" "$bin" tap --netns "/run/netns/$g" --tap untap0 --no-dns --api /tmp/unfwd-$$.sock 2>/dev/null & pids+=($!)
sleep 1
ip netns exec "$h" "$bin" ctl --api /tmp/unfwd-$$.sock expose 127.0.0.1:15201 192.168.65.3:5201 >/dev/null
ip netns exec "$h" "$bin" ctl --api /tmp/unfwd-$$.sock expose 127.0.0.1:15007 192.168.65.3:7 >/dev/null
measure usernet
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'

# pasta: -t forwards from the caller's namespace (ours) into the guest namespace.
if command -v pasta >/dev/null; then
    g=unfwd-p-$$; nss+=("$g"); ip netns add "$g"; ip -n "$g" link set lo up
    guest_servers "$g"
    # --runas 0: pasta run as root otherwise drops to nobody and cannot join --netns.
    ip netns exec "$h" pasta -f -q --runas 0 -4 --config-net -I tap0 -a 10.0.2.100 -n 24 -g 10.0.2.2 \
        -m 65520 -t 15201:5201,15007:7 -u none -T none -U none --no-dhcp --no-ndp --no-dhcpv6 --no-ra \
        --netns "/run/netns/$g" >/dev/null 2>&1 & pids+=($!)
    sleep 1
    measure pasta
fi

# slirp4netns: host forwards through its API socket.
if command -v slirp4netns >/dev/null; then
    g=unfwd-s-$$; nss+=("$g"); ip netns add "$g"; ip -n "$g" link set lo up
    guest_servers "$g"
    ip netns exec "$h" slirp4netns --configure --mtu=65520 --disable-dns --api-socket /tmp/unfwd-$$.sock \
        --netns-type=path "/run/netns/$g" tap0 >/dev/null 2>&1 & pids+=($!)
    sleep 1
    for pair in 15201:5201 15007:7; do
        ip netns exec "$h" python3 -c '
import json, socket, sys
hp, gp = map(int, sys.argv[2].split(":"))
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(json.dumps({"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": hp, "guest_port": gp}}).encode())
s.recv(4096)' "/tmp/unfwd-$$.sock" "$pair"
    done
    measure slirp4netns
fi
