//! usernet-core: the sans-IO heart of usernet.
//!
//! A [`Stack`] is a plain state machine. Its owner (the tokio driver in production, the
//! turmoil world in the simulator, a unit test) feeds it:
//! - guest Ethernet frames ([`Stack::handle_frame`]),
//! - host events (connect results, bytes, EOF, resets, UDP datagrams, ping replies),
//! - the current time,
//!
//! then calls [`Stack::poll`] and drains what came out: frames for the guest
//! ([`Stack::peek_frame`] / [`Stack::pop_frame`]), commands for the host
//! ([`Stack::poll_command`]) and the next deadline ([`Stack::poll_timeout`]).
//!
//! Nothing in this crate reads a clock, the OS RNG or the environment: time is an argument
//! and randomness comes from the seeded generator handed to [`Stack::new`].

pub mod config;
mod device;
pub mod dhcp;
pub mod dns;
mod icmp;
pub mod proxy;
pub mod stack;
pub mod stats;
pub mod switch;
mod tcp;
mod udp;
pub mod wire;

pub use config::{Config, ConfigError, DhcpConfig, IcmpConfig, Subnet, TcpConfig, UdpConfig};
pub use proxy::{ProxyConfig, ProxyStats};
pub use smoltcp::time::{Duration, Instant};
pub use stack::{ConnectError, FlowId, HostCommand, InboundError, Stack};
pub use stats::{DropReason, Stats};
pub use switch::{PortId, Switch, SwitchConfig};
pub use tcp::TcpFlowInfo;

/// The generator the owner hands in. ChaCha8 is fast and, seeded, fully reproducible.
pub type Rng = rand_chacha::ChaCha8Rng;

#[cfg(test)]
mod tests;
