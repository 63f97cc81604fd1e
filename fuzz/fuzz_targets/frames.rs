//! Arbitrary guest frames and host events into the core: it must never panic, and its
//! memory must stay bounded (flow tables and queues within their limits).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rand_chacha::rand_core::SeedableRng;
use usernet_core::{Config, ConnectError, FlowId, HostCommand, Instant, Rng, Stack};

#[derive(Arbitrary, Debug)]
enum Step {
    /// A raw frame, as the guest might send anything.
    Frame(Vec<u8>),
    /// A frame built to get past the first checks: Ethernet to the gateway, IPv4 with a
    /// valid header checksum, the given protocol and payload.
    Ipv4 { proto: u8, dst: [u8; 4], payload: Vec<u8> },
    Connected(u8),
    ConnectFailed(u8),
    HostData(u8, Vec<u8>),
    HostEof(u8),
    HostReset(u8),
    ConsumeToHost(u8, u16),
    Udp(u8, [u8; 4], u16, Vec<u8>),
    Ping(u8, u16, Vec<u8>),
    Mtu(u16),
    Advance(u16),
}

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn ipv4_frame(gw_mac: [u8; 6], proto: u8, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&gw_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(total.min(65535) as u16).to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&[192, 168, 65, 3]);
    h[16..20].copy_from_slice(&dst);
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(payload);
    f
}

fuzz_target!(|steps: Vec<Step>| {
    let mut config = Config::default();
    config.tcp.rx_buffer = 8192;
    config.tcp.tx_buffer = 8192;
    config.tcp.max_flows = 16;
    config.udp.max_flows = 8;
    config.icmp.max_flows = 8;
    let gw_mac = config.gateway_mac;
    let mut now = 0i64;
    let mut stack = Stack::new(config, Rng::seed_from_u64(0), Instant::from_millis(now)).unwrap();
    let mut flows: Vec<FlowId> = Vec::new();
    let pick = |flows: &Vec<FlowId>, i: u8| flows.get(usize::from(i) % flows.len().max(1)).copied();
    for step in steps.into_iter().take(256) {
        let t = Instant::from_millis(now);
        match step {
            Step::Frame(f) => stack.handle_frame(t, &f),
            Step::Ipv4 { proto, dst, payload } => stack.handle_frame(t, &ipv4_frame(gw_mac, proto, dst, &payload)),
            Step::Connected(i) => {
                if let Some(f) = pick(&flows, i) {
                    stack.tcp_connected(t, f)
                }
            }
            Step::ConnectFailed(i) => {
                if let Some(f) = pick(&flows, i) {
                    stack.tcp_connect_failed(t, f, ConnectError::Refused)
                }
            }
            Step::HostData(i, data) => {
                if let Some(f) = pick(&flows, i) {
                    stack.tcp_from_host(f, |b| {
                        let n = b.len().min(data.len());
                        b[..n].copy_from_slice(&data[..n]);
                        (n, ())
                    });
                }
            }
            Step::HostEof(i) => {
                if let Some(f) = pick(&flows, i) {
                    stack.tcp_host_eof(f)
                }
            }
            Step::HostReset(i) => {
                if let Some(f) = pick(&flows, i) {
                    stack.tcp_host_reset(f)
                }
            }
            Step::ConsumeToHost(i, n) => {
                if let Some(f) = pick(&flows, i) {
                    let avail = stack.tcp_to_host(f).len();
                    stack.tcp_consume_to_host(f, avail.min(usize::from(n)));
                }
            }
            Step::Udp(i, from, port, data) => {
                if let Some(f) = pick(&flows, i) {
                    stack.udp_from_host(t, f, (std::net::Ipv4Addr::from(from), port).into(), &data)
                }
            }
            Step::Ping(i, seq, data) => {
                if let Some(f) = pick(&flows, i) {
                    stack.ping_reply(t, f, seq, &data)
                }
            }
            Step::Mtu(m) => {
                let _ = stack.set_mtu(t, m);
            }
            Step::Advance(ms) => now += i64::from(ms),
        }
        stack.poll(Instant::from_millis(now));
        while let Some(cmd) = stack.poll_command() {
            let id = match cmd {
                HostCommand::TcpConnect { flow, .. }
                | HostCommand::UdpSend { flow, .. }
                | HostCommand::PingSend { flow, .. } => flow,
                _ => continue,
            };
            if !flows.contains(&id) {
                flows.push(id);
            }
        }
        while stack.peek_frame().is_some() {
            stack.pop_frame();
        }
        assert!(stack.tcp_flow_count() <= 16);
        assert!(stack.udp_flow_count() <= 8);
        assert!(stack.ping_flow_count() <= 8);
        if flows.len() > 64 {
            flows.drain(..32);
        }
    }
});
