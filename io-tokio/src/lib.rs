//! usernet's I/O side: the driver loop that joins the sans-IO core to frame transports
//! (TAP, QEMU stream) and to the host network, plus the daemon's command line.

pub mod api;
pub mod cli;
pub mod driver;
pub mod forward;
pub mod framing;
pub mod guest;
pub mod hostnet;
pub mod listen;
pub mod netns;
pub mod pcap;
pub mod ping;
pub mod proxy;
pub mod stream;
pub mod tap;
#[doc(hidden)]
pub mod testutil;
pub mod transport;
pub mod unixgram;
pub mod vmnet;
pub mod vswitch;

pub use driver::Driver;
pub use hostnet::{HostNet, TokioNet};
pub use transport::FrameTransport;
