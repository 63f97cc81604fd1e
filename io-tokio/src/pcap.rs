//! Capture of the guest link in classic pcap format (`--pcap FILE`).
//!
//! The file is the original libpcap format (magic `0xa1b2c3d4` written little-endian,
//! version 2.4, microsecond timestamps, `LINKTYPE_ETHERNET`), which tcpdump, tshark and
//! Wireshark all read. Every frame the driver takes from the guest transport and every
//! frame it hands to it is one record, stamped with the system clock (the wall clock a
//! reader expects; the core's clock is a monotonic offset).
//!
//! Records go through a [`BufWriter`]: writing one costs two buffered copies and no
//! allocation. A background task flushes the buffer once a second while records arrive,
//! so a capture can be followed while the daemon runs; the rest is flushed when the
//! [`Pcap`] is dropped. A size cap (`--pcap-max-bytes`) stops the capture for good, with
//! one log line, when the next record would not fit; a write error does the same.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

/// Magic number of the microsecond-resolution format.
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// `LINKTYPE_ETHERNET` (DLT_EN10MB).
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Size of the file header.
pub const GLOBAL_HEADER_LEN: usize = 24;
/// Size of each record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Default snap length: the largest Ethernet frame the transports carry is cut to this.
pub const DEFAULT_SNAPLEN: u32 = 65535;
/// Largest snap length accepted (libpcap's own maximum).
pub const MAX_SNAPLEN: u32 = 262_144;
/// How often buffered records are pushed to the file while a capture is running.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Size of the write buffer.
const BUFFER: usize = 64 * 1024;

/// The capture options of the daemon subcommands.
#[derive(Args, Debug, Clone, Default)]
pub struct PcapArgs {
    /// Write every frame to and from the guest to FILE in pcap format (tcpdump -r FILE).
    /// The file is created, or truncated, mode 0600.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// Bytes kept of each captured frame (the record says how long the frame was).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SNAPLEN,
          value_parser = clap::value_parser!(u32).range(1..=MAX_SNAPLEN as i64),
          requires = "pcap")]
    pub pcap_snaplen: u32,
    /// Stop capturing (logged once) when the file would grow past BYTES.
    #[arg(long, value_name = "BYTES", requires = "pcap")]
    pub pcap_max_bytes: Option<u64>,
}

impl PcapArgs {
    /// Open the capture these options ask for, if any. Must be called within a tokio
    /// runtime (the flusher is a task).
    pub fn open(&self) -> io::Result<Option<Pcap>> {
        let Some(path) = &self.pcap else {
            return Ok(None);
        };
        let p = Pcap::create(path, self.pcap_snaplen, self.pcap_max_bytes)?;
        p.spawn_flusher();
        tracing::info!(path = %path.display(), snaplen = self.pcap_snaplen,
            max_bytes = ?self.pcap_max_bytes, "capturing frames (pcap)");
        Ok(Some(p))
    }
}

/// The file header.
pub fn global_header(snaplen: u32) -> [u8; GLOBAL_HEADER_LEN] {
    let mut h = [0u8; GLOBAL_HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes()); // version major
    h[6..8].copy_from_slice(&4u16.to_le_bytes()); // version minor
                                                  // thiszone (i32) and sigfigs (u32) stay 0: timestamps are UTC.
    h[16..20].copy_from_slice(&snaplen.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// The header of a record of a `orig_len`-byte frame of which `incl_len` bytes are kept.
pub fn record_header(ts: Duration, incl_len: u32, orig_len: u32) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    // The classic format's seconds are 32 bits: they wrap in 2106.
    h[0..4].copy_from_slice(&(ts.as_secs() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&ts.subsec_micros().to_le_bytes());
    h[8..12].copy_from_slice(&incl_len.to_le_bytes());
    h[12..16].copy_from_slice(&orig_len.to_le_bytes());
    h
}

/// Counters of a capture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PcapStats {
    /// Records written.
    pub frames: u64,
    /// Bytes written, headers included (the file's size once flushed).
    pub bytes: u64,
    /// Frames not written because the cap was reached or writing failed.
    pub skipped: u64,
}

/// A pcap writer over any byte sink.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: BufWriter<W>,
    snaplen: u32,
    max_bytes: u64,
    stats: PcapStats,
    /// No more records: the cap was reached or a write failed (already logged).
    stopped: bool,
    /// Records buffered since the last flush.
    dirty: bool,
}

impl<W: Write> PcapWriter<W> {
    /// Write the file header to `out`. `max_bytes` caps the whole file (the header is
    /// always written).
    pub fn new(out: W, snaplen: u32, max_bytes: Option<u64>) -> io::Result<Self> {
        let snaplen = snaplen.clamp(1, MAX_SNAPLEN);
        let mut out = BufWriter::with_capacity(BUFFER, out);
        out.write_all(&global_header(snaplen))?;
        Ok(PcapWriter {
            out,
            snaplen,
            max_bytes: max_bytes.unwrap_or(u64::MAX),
            stats: PcapStats {
                bytes: GLOBAL_HEADER_LEN as u64,
                ..PcapStats::default()
            },
            stopped: false,
            dirty: true,
        })
    }

    /// Record `frame`, seen at `ts` (time since the Unix epoch).
    pub fn record_at(&mut self, ts: Duration, frame: &[u8]) {
        if self.stopped {
            self.stats.skipped += 1;
            return;
        }
        let orig = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let incl = orig.min(self.snaplen);
        let size = (RECORD_HEADER_LEN as u64) + u64::from(incl);
        if self.stats.bytes.saturating_add(size) > self.max_bytes {
            tracing::warn!(
                max_bytes = self.max_bytes,
                frames = self.stats.frames,
                "pcap size cap reached; capture stopped"
            );
            self.stop();
            return;
        }
        let r = self
            .out
            .write_all(&record_header(ts, incl, orig))
            .and_then(|()| self.out.write_all(&frame[..incl as usize]));
        match r {
            Ok(()) => {
                self.stats.frames += 1;
                self.stats.bytes += size;
                self.dirty = true;
            }
            Err(e) => {
                tracing::warn!("pcap write failed: {e}; capture stopped");
                self.stop();
            }
        }
    }

    /// Record `frame`, stamped with the system clock.
    pub fn record(&mut self, frame: &[u8]) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.record_at(ts, frame);
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.stats.skipped += 1;
        // What was written so far is a valid capture: push it out.
        self.flush();
    }

    /// Push buffered records to the sink. A failure is logged and ends the capture.
    pub fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Err(e) = self.out.flush() {
            if !self.stopped {
                tracing::warn!("pcap flush failed: {e}; capture stopped");
                self.stopped = true;
            }
        }
    }

    pub fn stats(&self) -> PcapStats {
        self.stats
    }

    /// The sink (buffered records not yet written to it).
    pub fn get_ref(&self) -> &W {
        self.out.get_ref()
    }
}

/// A capture to a file, shared by whoever records frames (the driver and, on a switch of
/// several guests, the switch for the frames it carries between them). Its flusher task
/// holds only a weak reference: dropping the last handle ends the capture.
#[derive(Clone, Debug)]
pub struct Pcap {
    inner: Arc<Capture>,
}

#[derive(Debug)]
struct Capture {
    writer: Mutex<PcapWriter<File>>,
    path: PathBuf,
}

impl Pcap {
    /// Create (or truncate) `path`, mode 0600 (a capture holds the guest's traffic), and
    /// write the file header. A symbolic link is refused: the daemon often runs as root
    /// and the path is often in a shared directory such as /tmp.
    pub fn create(path: &Path, snaplen: u32, max_bytes: Option<u64>) -> io::Result<Pcap> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                let why = if e.raw_os_error() == Some(libc::ELOOP) {
                    "it is a symbolic link".to_string()
                } else {
                    crate::tap::os_msg(&e)
                };
                io::Error::new(
                    e.kind(),
                    format!("cannot create pcap file {}: {why}", path.display()),
                )
            })?;
        let w = PcapWriter::new(f, snaplen, max_bytes)?;
        Ok(Pcap {
            inner: Arc::new(Capture {
                writer: Mutex::new(w),
                path: path.to_owned(),
            }),
        })
    }

    /// Flush once a second while the capture exists (a task on the current runtime).
    pub fn spawn_flusher(&self) {
        let weak: Weak<Capture> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if let Ok(mut w) = inner.writer.lock() {
                    w.flush();
                };
            }
        });
    }

    /// Record one frame (system clock).
    pub fn record(&self, frame: &[u8]) {
        if let Ok(mut w) = self.inner.writer.lock() {
            w.record(frame);
        }
    }

    /// Write out buffered records.
    pub fn flush(&self) {
        if let Ok(mut w) = self.inner.writer.lock() {
            w.flush();
        }
    }

    pub fn stats(&self) -> PcapStats {
        self.inner.stats()
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Capture {
    fn stats(&self) -> PcapStats {
        self.writer.lock().map(|w| w.stats()).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.get_mut() {
            w.flush();
        }
        let s = self.stats();
        tracing::info!(path = %self.path.display(), frames = s.frames, bytes = s.bytes,
            skipped = s.skipped, "pcap capture closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_header_is_byte_exact() {
        let h = global_header(65535);
        assert_eq!(
            h,
            [
                0xd4, 0xc3, 0xb2, 0xa1, // magic, little-endian
                2, 0, 4, 0, // version 2.4
                0, 0, 0, 0, // thiszone
                0, 0, 0, 0, // sigfigs
                0xff, 0xff, 0, 0, // snaplen 65535
                1, 0, 0, 0, // LINKTYPE_ETHERNET
            ]
        );
    }

    #[test]
    fn record_is_byte_exact() {
        let mut w = PcapWriter::new(Vec::new(), 65535, None).unwrap();
        let frame: Vec<u8> = (0u8..60).collect();
        w.record_at(Duration::new(0x6543_2101, 123_456_789), &frame);
        w.flush();
        let out = w.get_ref();
        assert_eq!(out.len(), GLOBAL_HEADER_LEN + RECORD_HEADER_LEN + 60);
        assert_eq!(
            &out[24..40],
            &[
                0x01, 0x21, 0x43, 0x65, // ts_sec
                0x40, 0xe2, 0x01, 0x00, // ts_usec 123456 (sub-microseconds cut)
                60, 0, 0, 0, // incl_len
                60, 0, 0, 0, // orig_len
            ]
        );
        assert_eq!(&out[40..], &frame[..]);
        assert_eq!(
            w.stats(),
            PcapStats {
                frames: 1,
                bytes: 100,
                skipped: 0
            }
        );
    }

    #[test]
    fn snaplen_truncates_but_keeps_the_original_length() {
        let mut w = PcapWriter::new(Vec::new(), 64, None).unwrap();
        let frame = vec![0xabu8; 1514];
        w.record_at(Duration::from_secs(1), &frame);
        let small = [0x11u8; 42];
        w.record_at(Duration::from_secs(2), &small);
        w.flush();
        let out = w.get_ref();
        assert_eq!(&out[16..20], &64u32.to_le_bytes(), "snaplen in the header");
        let r1 = &out[24..];
        assert_eq!(&r1[8..12], &64u32.to_le_bytes(), "incl_len");
        assert_eq!(&r1[12..16], &1514u32.to_le_bytes(), "orig_len");
        assert!(r1[16..80].iter().all(|&b| b == 0xab));
        let r2 = &r1[80..];
        assert_eq!(&r2[8..12], &42u32.to_le_bytes());
        assert_eq!(&r2[12..16], &42u32.to_le_bytes());
        assert_eq!(&r2[16..], &small[..]);
        assert_eq!(out.len(), 24 + 16 + 64 + 16 + 42);
    }

    #[test]
    fn size_cap_stops_the_capture_before_it_is_exceeded() {
        // Room for the header and exactly two 100-byte records (16 + 100 each).
        let cap = 24 + 2 * 116 + 50;
        let mut w = PcapWriter::new(Vec::new(), 65535, Some(cap)).unwrap();
        for i in 0..5u64 {
            w.record_at(Duration::from_secs(i), &[i as u8; 100]);
        }
        w.flush();
        let out = w.get_ref();
        assert_eq!(out.len(), 24 + 2 * 116);
        assert!(out.len() as u64 <= cap);
        assert_eq!(
            w.stats(),
            PcapStats {
                frames: 2,
                bytes: 24 + 2 * 116,
                skipped: 3
            }
        );
        // A smaller frame that would still fit is not written either: the capture stays
        // stopped rather than having holes.
        w.record_at(Duration::from_secs(9), &[0u8; 14]);
        w.flush();
        assert_eq!(w.get_ref().len(), 24 + 2 * 116);
    }

    #[test]
    fn a_failing_sink_stops_the_capture_without_panicking() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = PcapWriter::new(Full, 65535, None).unwrap();
        // The header sits in the buffer; flushing it fails.
        w.flush();
        w.record_at(Duration::ZERO, &[0u8; 60]);
        assert_eq!(w.stats().frames, 0);
        assert_eq!(w.stats().skipped, 1);
    }

    #[test]
    fn file_capture_round_trip() {
        let path = std::env::temp_dir().join(format!("usernet-pcap-{}.pcap", std::process::id()));
        let p = Pcap::create(&path, 65535, None).unwrap();
        p.record(&[0x5au8; 60]);
        drop(p);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(bytes.len(), 24 + 16 + 60);
        assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
    }

    #[test]
    fn a_symlink_is_refused() {
        let dir = std::env::temp_dir().join(format!("usernet-pcap-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.join("cap.pcap");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Pcap::create(&link, 65535, None).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn options_parse_and_are_checked() {
        use crate::cli::Cli;
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "usernet",
            "stream",
            "--socket",
            "/tmp/s",
            "--pcap",
            "/tmp/c.pcap",
            "--pcap-snaplen",
            "128",
            "--pcap-max-bytes",
            "1000000",
        ])
        .unwrap();
        let p = &cli.command.net().unwrap().pcap;
        assert_eq!(p.pcap.as_deref(), Some(Path::new("/tmp/c.pcap")));
        assert_eq!(p.pcap_snaplen, 128);
        assert_eq!(p.pcap_max_bytes, Some(1_000_000));
        let cli = Cli::try_parse_from(["usernet", "tap", "--tap", "t"]).unwrap();
        let p = &cli.command.net().unwrap().pcap;
        assert_eq!((p.pcap.is_none(), p.pcap_snaplen), (true, DEFAULT_SNAPLEN));
        for bad in [
            &["--pcap-snaplen", "100"][..],
            &["--pcap", "/tmp/c", "--pcap-snaplen", "0"],
            &["--pcap", "/tmp/c", "--pcap-snaplen", "262145"],
            &["--pcap-max-bytes", "5"],
        ] {
            let mut args = vec!["usernet", "tap", "--tap", "t"];
            args.extend_from_slice(bad);
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?}");
        }
    }
}
