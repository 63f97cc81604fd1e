//! Helpers shared by the library's unit tests and the integration tests (which cannot
//! see `#[cfg(test)]` code). Not part of the daemon's interface.

use std::net::Ipv4Addr;

/// A DHCP DISCOVER (`request: None`) or REQUEST from `mac`, as a broadcast frame.
pub fn dhcp_frame(mac: [u8; 6], xid: u32, request: Option<Ipv4Addr>) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[10] = 0x80;
    m[28..34].copy_from_slice(&mac);
    m.extend_from_slice(&[99, 130, 83, 99]);
    match request {
        None => m.extend_from_slice(&[53, 1, 1]),
        Some(ip) => {
            m.extend_from_slice(&[53, 1, 3, 50, 4]);
            m.extend_from_slice(&ip.octets());
            m.extend_from_slice(&[54, 4, 192, 168, 65, 1]);
        }
    }
    m.push(255);
    let udp_len = 8 + m.len();
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[16..20].copy_from_slice(&[255; 4]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&m);
    crate::vmnet::fill_ipv4_checksum(&mut f);
    f
}
