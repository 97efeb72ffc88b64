//! Running an operator's command (a backup hook, a drill's validation):
//! its output drained while it runs, its tail kept within a bound, and the
//! whole process group stopped when it runs too long.
//!
//! Reading a child's stderr only after it exits deadlocks as soon as it
//! writes more than a pipe holds (64 KiB): the child waits for a reader
//! and the parent for the child, until the timeout. And killing `/bin/sh`
//! on a timeout leaves what it started running. So the command gets a
//! process group of its own, both pipes are read by threads from the
//! start, and a timeout sends SIGTERM to the group, then SIGKILL after a
//! grace period.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a group has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How a command ended.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status; `None` when it was killed after its timeout.
    pub status: Option<ExitStatus>,
    /// The end of what it wrote to stdout and stderr, interleaved as it
    /// came, at most the `keep` bytes asked for (with `[…]` in front when
    /// cut).
    pub output: String,
}

/// A bounded tail of bytes.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    keep: usize,
    cut: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        if self.cut {
            // A cut may split a character: drop what is left of it.
            let start = text.char_indices().nth(1).map_or(0, |(i, _)| i);
            format!("[…]{}", &text[start..])
        } else {
            text.into_owned()
        }
    }
}

/// Runs `command` (its stdin from /dev/null, stdout and stderr captured)
/// for at most `timeout`, keeping the last `keep` bytes of its output.
pub fn run(command: &mut Command, timeout: Duration, keep: usize) -> std::io::Result<Finished> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn()?;
    let tail = Arc::new(Mutex::new(Tail {
        keep,
        ..Tail::default()
    }));
    let drains: Vec<_> = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| drain(r, tail.clone()))
    .collect();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            stop_group(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // What the command started in the background may keep the pipes open:
    // give them a moment, then report without them.
    let deadline = Instant::now() + Duration::from_secs(1);
    for d in drains {
        while !d.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if d.is_finished() {
            let _ = d.join();
        }
    }
    let output = tail.lock().expect("tail poisoned").text();
    Ok(Finished { status, output })
}

/// Reads `r` to its end into `tail`, on a thread of its own.
fn drain(mut r: Box<dyn Read + Send>, tail: Arc<Mutex<Tail>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => tail.lock().expect("tail poisoned").push(&buf[..n]),
            }
        }
    })
}

/// Stops a child started in a process group of its own, and everything
/// in that group: SIGTERM, then SIGKILL after [`KILL_GRACE`] to whatever
/// is left (a child that ignores SIGTERM included). Waits for the child.
pub fn stop_group(child: &mut Child) {
    let group = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals that process group; it
    // touches no memory of ours.
    unsafe { libc::kill(-group, libc::SIGTERM) };
    let until = Instant::now() + KILL_GRACE;
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) && !group_alive(group) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let _ = child.wait();
}

/// True while any process of `group` is alive.
fn group_alive(group: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-group, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_writing_a_mebibyte_to_stderr_completes_and_keeps_its_tail() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "head -c 1048576 /dev/zero | tr '\\0' x >&2; echo done >&2",
        ]);
        let done = run(&mut cmd, Duration::from_secs(30), 100).unwrap();
        assert!(done.status.unwrap().success());
        assert!(done.output.starts_with("[…]"), "{}", done.output);
        assert!(done.output.ends_with("done\n"), "{}", done.output);
        assert!(done.output.len() <= 100 + "[…]".len());
    }

    #[test]
    fn a_child_that_ignores_sigterm_is_gone_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 1; done' & wait",
            pid_file.display()
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script]);
        let started = Instant::now();
        let done = run(&mut cmd, Duration::from_millis(500), 1000).unwrap();
        assert!(done.status.is_none(), "killed, not exited");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: libc::pid_t = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Dead: gone, or a zombie its new parent has not reaped yet.
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => true,
                Ok(stat) => stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z')),
            }
        });
        assert!(gone, "the grandchild {pid} that ignores SIGTERM still runs");
    }
}
