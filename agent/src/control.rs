//! The control socket: how `lifeboat run JOB` and `lifeboat backup
//! --source NAME` ask a running agent to run a job now and watch it.
//!
//! A Unix stream socket readable and writable by its owner only (the
//! agent runs as root, so only root may drive it), speaking JSON lines:
//! the client sends one request line, the agent answers with event lines
//! (`started`, `progress`, `finished`) and closes the connection, or with
//! one `{"error": ...}` line. Both ends are small enough to read in full
//! here; the client is synchronous because the CLI is.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::scheduler::{JobId, Request};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Binds the control socket at `path`: creates its directory (mode 0700
/// when new), replaces a stale socket left by a crashed agent, refuses to
/// start when another agent answers there, and restricts the socket to
/// its owner.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another agent is already listening on {} (stop it first, or set agent.control_socket)",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the control socket until `shutdown` resolves, forwarding run
/// requests to the scheduler.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    scheduler: mpsc::Sender<Request>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let scheduler = scheduler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, scheduler).await {
                            log::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    log::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(stream: UnixStream, scheduler: mpsc::Sender<Request>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST as u64));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("no request within 5 s"))??;
    let request: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return reply_error(&mut write, &format!("bad request: {e}")).await,
    };
    if let Some(job) = request.get("run").and_then(Value::as_str) {
        let job: JobId = match job.parse() {
            Ok(j) => j,
            Err(e) => return reply_error(&mut write, &e).await,
        };
        let (events, mut events_rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        if scheduler
            .send(Request::RunNow { job, events, reply })
            .await
            .is_err()
        {
            return reply_error(&mut write, "the agent is stopping").await;
        }
        match answer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return reply_error(&mut write, &e).await,
            Err(_) => return reply_error(&mut write, "the agent is stopping").await,
        }
        while let Some(event) = events_rx.recv().await {
            let mut text = serde_json::to_string(&event).map_err(std::io::Error::other)?;
            text.push('\n');
            // A client that went away does not stop the job.
            if write.write_all(text.as_bytes()).await.is_err() {
                break;
            }
        }
        return Ok(());
    }
    if request.get("next").is_some() {
        let (reply, answer) = oneshot::channel();
        if scheduler.send(Request::NextRuns(reply)).await.is_ok() {
            if let Ok(list) = answer.await {
                let jobs: Vec<Value> = list
                    .into_iter()
                    .map(|(id, at, running)| {
                        json!({"job": id.to_string(), "next": at.to_rfc3339(), "running": running})
                    })
                    .collect();
                let mut text = json!({ "jobs": jobs }).to_string();
                text.push('\n');
                write.write_all(text.as_bytes()).await?;
                return Ok(());
            }
        }
        return reply_error(&mut write, "the agent is stopping").await;
    }
    reply_error(
        &mut write,
        "unknown request: send {\"run\": \"JOB\"} or {\"next\": true}",
    )
    .await
}

async fn reply_error(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    message: &str,
) -> std::io::Result<()> {
    let mut text = json!({ "error": message }).to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

/// The client side, for the CLI: asks the agent listening on `socket` to
/// run `job`, calling `on_event` with each event. Returns `Ok(None)` when
/// no agent listens there (the caller then runs the job itself).
pub fn request_run(
    socket: &Path,
    job: &str,
    mut on_event: impl FnMut(&Value),
) -> Result<Option<Value>, String> {
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(format!(
                "cannot reach the agent at {}: {e}",
                socket.display()
            ))
        }
    };
    let mut request = json!({ "run": job }).to_string();
    request.push('\n');
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot talk to the agent: {e}"))?;
    let mut last = None;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| format!("lost the agent's connection: {e}"))?;
        let event: Value =
            serde_json::from_str(&line).map_err(|e| format!("bad answer from the agent: {e}"))?;
        if let Some(error) = event.get("error").and_then(Value::as_str) {
            return Err(format!("the agent refused: {error}"));
        }
        on_event(&event);
        last = Some(event);
    }
    match last {
        Some(v) if v.get("event").and_then(Value::as_str) == Some("finished") => Ok(Some(v)),
        _ => Err("the agent closed the connection before the job finished".to_string()),
    }
}
