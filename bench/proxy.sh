#!/usr/bin/env bash
# Requests per second and transfer rate through usernet's transparent proxy against the
# same curl going direct, and against the guest using the same upstream proxy itself
# (http_proxy through usernet's host alias: the upstream's own cost without usernet's
# proxy logic). Root; everything runs in namespaces this script creates and removes.
# Needs nginx (nginx-light), tinyproxy and curl. Usage: bench/proxy.sh [REQUESTS] [MB]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3000}
mb=${2:-500}
bin=target/release/usernet
[ -x "$bin" ] || cargo build --release -p usernet
h=unpxb-h-$$; g=unpxb-g-$$
dir=$(mktemp -d /tmp/usernet-proxy-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$h" 2>/dev/null || true; ip netns del "$g" 2>/dev/null || true
    rm -rf "$dir" "/etc/netns/$h"
}
trap cleanup EXIT
ip netns add "$h"; ip netns add "$g"
ip -n "$h" link set lo up
ip -n "$h" addr add 10.99.0.1/32 dev lo
mkdir -p "/etc/netns/$h"
printf '127.0.0.1 localhost\n10.99.0.1 web.bench.test\n' > "/etc/netns/$h/hosts"
ip -n "$g" tuntap add dev untap0 mode tap; ip -n "$g" link set untap0 mtu 65520
ip -n "$g" addr add 192.168.65.3/24 dev untap0; ip -n "$g" link set untap0 up; ip -n "$g" route add default via 192.168.65.1

mkdir -p "$dir/www"
echo ok > "$dir/www/small"
truncate -s "${mb}M" "$dir/www/big"
cat > "$dir/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path $dir;
    server { listen 10.99.0.1:80; root $dir/www; }
}
NGINX
ip netns exec "$h" nginx -c "$dir/nginx.conf" &
pids+=($!)
cat > "$dir/tinyproxy.conf" <<TP
Port 3129
Listen 127.0.0.1
Timeout 60
LogFile "$dir/tinyproxy.log"
LogLevel Error
MaxClients 100
Allow 127.0.0.1
DisableViaHeader Yes
TP
ip netns exec "$h" tinyproxy -d -c "$dir/tinyproxy.conf" &
pids+=($!)
sleep 0.5
# Warm the page cache: the first download must not pay for it.
ip netns exec "$h" curl -sS -o /dev/null http://10.99.0.1/big

for i in $(seq "$n"); do printf 'url = "http://web.bench.test/small"\noutput = "/dev/null"\n'; done > "$dir/urls"

# curl in the guest: the time for N small requests (keep-alive, then a connection per
# request), then one large download.
measure() {
    local label=$1; shift
    local env=("$@")
    local t0 t1 ka close rate
    t0=$(date +%s.%N)
    ip netns exec "$g" env "${env[@]}" curl -sS --resolve web.bench.test:80:10.99.0.1 -K "$dir/urls"
    t1=$(date +%s.%N)
    ka=$(echo "$n / ($t1 - $t0)" | bc -l)
    t0=$(date +%s.%N)
    ip netns exec "$g" env "${env[@]}" curl -sS --resolve web.bench.test:80:10.99.0.1 -H 'Connection: close' -K "$dir/urls"
    t1=$(date +%s.%N)
    close=$(echo "$n / ($t1 - $t0)" | bc -l)
    rate=$(ip netns exec "$g" env "${env[@]}" curl -sS --resolve web.bench.test:80:10.99.0.1 -o /dev/null \
        -w '%{speed_download}' http://web.bench.test/big)
    printf '%-44s %8.0f req/s keep-alive %8.0f req/s new conn %8.2f Gbit/s\n' "$label" "$ka" "$close" \
        "$(echo "$rate * 8 / 1000000000" | bc -l)"
}

run_usernet() {
    ip netns exec "$h" "$bin" tap --netns "/run/netns/$g" --tap untap0 --no-dns "$@" 2>"$dir/usernet.log" &
    pids+=($!); sleep 0.5
}
stop_usernet() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

run_usernet
measure "direct (no proxy configured)" no_proxy='*'
measure "guest http_proxy=host alias:3129 (tinyproxy)" http_proxy=http://192.168.65.2:3129 no_proxy=
stop_usernet
run_usernet --http-proxy http://127.0.0.1:3129
measure "transparent proxy -> tinyproxy" no_proxy='*'
stop_usernet
run_usernet --http-proxy http://127.0.0.1:3129 --no-proxy web.bench.test
measure "transparent proxy, destination excluded" no_proxy='*'
stop_usernet
