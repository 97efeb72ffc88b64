//! systemd integration: `sd_notify` readiness, status text and watchdog
//! keep-alives, spoken directly over the `$NOTIFY_SOCKET` datagram socket
//! (the protocol is a few `KEY=VALUE` lines; see sd_notify(3)), so no C
//! library is needed. Outside systemd, where `$NOTIFY_SOCKET` is unset,
//! every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring
    /// `$WATCHDOG_PID`, which names the process the watchdog is for).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            let addr = match bytes.first() {
                // An abstract socket is written with a leading '@'.
                Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).ok()?,
                Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(&path)).ok()?,
                _ => return None,
            };
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd set, as
    /// sd_watchdog_enabled(3) advises; `None` without a watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one notification; failures are logged once at debug level
    /// (a missing systemd must never stop the agent).
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::debug!("sd_notify failed: {e}");
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// Updates the status line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// A watchdog keep-alive.
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    /// Tells systemd the agent is reloading its configuration.
    pub fn reloading(&self) {
        let now = nix_monotonic_usec();
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    /// Tells systemd the agent is stopping.
    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// CLOCK_MONOTONIC in microseconds, which `RELOADING=1` must carry.
fn nix_monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket_in_the_sd_notify_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let addr = SocketAddr::from_pathname(&path).unwrap();
        let notifier = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), addr)),
            watchdog: Some(Duration::from_secs(10)),
        };
        notifier.ready("next: backup:etc in 14m\n(2 sources)");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"READY=1\nSTATUS=next: backup:etc in 14m (2 sources)"
        );
        notifier.watchdog();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn without_systemd_notifications_do_nothing() {
        let notifier = Notifier {
            socket: None,
            watchdog: None,
        };
        notifier.ready("x");
        assert_eq!(notifier.watchdog_interval(), None);
    }
}
