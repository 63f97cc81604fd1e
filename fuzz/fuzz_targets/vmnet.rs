//! Hostile VPNKit/hyperkit vmnet handshakes: the init and command messages and the
//! checksum fill-in applied to every frame of a vmnet client. Each must parse or be
//! refused with a reason, never panic; what parses must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usernet::vmnet::{
    fill_ipv4_checksum, init_reply, parse_command, parse_init, Command, Uuid, COMMAND_LEN,
    INIT_LEN,
};

fuzz_target!(|data: &[u8]| {
    if data.len() >= INIT_LEN {
        let init: [u8; INIT_LEN] = data[..INIT_LEN].try_into().unwrap();
        if let Ok(i) = parse_init(&init) {
            // Our answer is well-formed and echoes the commit.
            let r = parse_init(&init_reply(&i.commit)).expect("our init parses");
            assert_eq!(r.commit, i.commit);
            assert_eq!(r.version, 22);
        }
    }
    if data.len() >= COMMAND_LEN {
        let cmd: [u8; COMMAND_LEN] = data[..COMMAND_LEN].try_into().unwrap();
        if let Ok(Command::Ethernet { uuid: Some(u) } | Command::PreferredIpv4 { uuid: Some(u), .. }) =
            parse_command(&cmd)
        {
            // A parsed UUID is canonical: it parses to itself and its MAC is unicast,
            // locally administered.
            assert_eq!(Uuid::parse(&u.0).unwrap(), Some(u));
            assert_eq!(u.mac()[0] & 3, 2);
        }
    }
    let mut frame = data.to_vec();
    fill_ipv4_checksum(&mut frame);
    assert_eq!(frame.len(), data.len());
    if frame != data {
        // Only the checksum may change, and only from zero to a valid one.
        assert_eq!(&data[24..26], &[0, 0]);
        assert_eq!(frame[..24], data[..24]);
        assert_eq!(frame[26..], data[26..]);
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let mut sum: u32 = frame[14..14 + ihl]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
});
