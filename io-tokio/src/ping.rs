//! Unprivileged ICMP echo sockets (`SOCK_DGRAM`, `IPPROTO_ICMP`): the kernel fills in the
//! identifier and checksum and hands back only replies to this socket. Permitted when the
//! caller's group is in `net.ipv4.ping_group_range`; otherwise opening fails and the guest's
//! pings go unanswered (never a forged reply).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::hostnet::HostPing;

pub struct PingSocket {
    fd: AsyncFd<OwnedFd>,
    v6: bool,
}

impl PingSocket {
    pub fn open(dst: IpAddr) -> io::Result<Self> {
        let (domain, proto, v6) = match dst {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, false),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, true),
        };
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                domain,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                proto,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the descriptor for its whole life; nothing else closes it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PingSocket { fd, v6 })
    }
}

fn sockaddr(dst: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; zeroed is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match dst {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

impl HostPing for PingSocket {
    fn send(&self, dst: IpAddr, seq: u16, payload: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(8 + payload.len());
        msg.push(if self.v6 { 128 } else { 8 });
        msg.extend_from_slice(&[0, 0, 0, 0, 0]);
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(payload);
        let (ss, len) = sockaddr(SocketAddr::new(dst, 0));
        // SAFETY: valid buffer and address for the duration of the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &ss as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<(u16, usize)> {
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: valid buffer for the duration of the call.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) if n >= 8 => {
                    let reply_type = if self.v6 { 129 } else { 0 };
                    if buf[0] != reply_type {
                        continue;
                    }
                    let seq = u16::from_be_bytes([buf[6], buf[7]]);
                    buf.copy_within(8..n, 0);
                    return Ok((seq, n - 8));
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
