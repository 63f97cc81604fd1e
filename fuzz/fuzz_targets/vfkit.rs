//! Hostile vfkit datagrams and `--listen` specifications: classified or refused with a
//! reason, never a panic; a parsed spec prints back to itself.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use usernet::listen::ListenSpec;
use usernet::unixgram::{classify, Datagram};

#[derive(Arbitrary, Debug)]
enum Input {
    Datagram(Vec<u8>),
    Spec(String),
}

fuzz_target!(|input: Input| match input {
    Input::Datagram(d) => match classify(&d) {
        Datagram::Magic => assert_eq!(d, b"VFKT"),
        Datagram::Runt => assert!(d.len() < 14),
        Datagram::Frame => assert!(d.len() >= 14),
    },
    Input::Spec(s) => {
        if let Ok(spec) = s.parse::<ListenSpec>() {
            let again: ListenSpec = spec.to_string().parse().expect("printed spec parses");
            assert_eq!(again, spec);
        }
    }
});
