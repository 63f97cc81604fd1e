//! Hostile length-prefixed streams (QEMU u32 BE, VPNKit/gvisor u16 LE) cut into
//! arbitrary reads, and the frames they carry run through the layer-2 switch. Frames
//! handed out are always within the limits, the receive buffer never grows, an invalid
//! length ends the stream, and the switch never panics or outgrows its table.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usernet::framing::{FrameCodec, Framing, Scan, MIN_FRAME};
use usernet_core::switch::{Switch, SwitchConfig, Verdict};
use usernet_core::Instant;

#[derive(Arbitrary, Debug)]
struct Input {
    u16le: bool,
    /// Read sizes to cut the stream into (each at least 1).
    cuts: Vec<u16>,
    stream: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let framing = if input.u16le {
        Framing::U16Le
    } else {
        Framing::U32Be
    };
    let mut codec = FrameCodec::new(framing, 0);
    let mut config = SwitchConfig::new([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
    config.max_macs = 8;
    let mut switch = Switch::new(config);
    let ports = [switch.add_port().unwrap(), switch.add_port().unwrap()];
    let mut off = 0;
    let mut cut = input.cuts.iter().cycle();
    let mut n = 0u64;
    while off < input.stream.len() {
        let want = cut.next().map_or(input.stream.len(), |c| usize::from(*c).max(1));
        let end = (off + want).min(input.stream.len());
        let took = codec.feed(&input.stream[off..end]);
        assert!(took > 0, "a maximal frame always fits");
        off += took;
        match codec.scan() {
            Scan::Invalid(len) => {
                assert!((len as usize) < MIN_FRAME || len as usize > framing.max_frame());
                return;
            }
            Scan::NeedMore => {}
            Scan::Ready => {
                while let Some(f) = codec.next_frame() {
                    assert!(f.len() >= MIN_FRAME && f.len() <= framing.max_frame());
                    n += 1;
                    let port = ports[(n % 2) as usize];
                    let now = Instant::from_millis(n as i64);
                    let known = switch.destination(now, f);
                    if let Verdict::Port(p) = switch.from_guest(now, port, f) {
                        assert_ne!(p, port);
                        assert_eq!(known, Some(p), "destination agrees with the switch");
                    }
                    assert!(switch.mac_count() <= 8);
                    let f = f.to_vec();
                    assert!(codec.queue(&f));
                }
            }
        }
    }
});
