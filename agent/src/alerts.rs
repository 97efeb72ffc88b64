//! Alerts through a webhook: a JSON POST when a job fails, when a source's
//! RPO or RTO target is breached, and when either recovers.
//!
//! Alerts fire on *transitions*, never on levels: the state last alerted
//! for each job and each (source, objective) is kept in the catalog's
//! state table, so a breach alerts once (and again only after it
//! recovered), a job failing every run alerts once until it succeeds, and
//! a restarted agent does not repeat what it already said. Delivery is
//! retried a few times with backoff; a webhook that stays down is logged
//! and does not hold up anything else.
//!
//! Payload: `{"kind": "job_failed" | "job_recovered" | "breached" |
//! "recovered", "host", "time", ...}` with the job or source, objective,
//! actual and target seconds, and the error where there is one.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use crate::catalog::{Catalog, Health, Outcome};
use crate::jobs::Agent;
use crate::scheduler::JobId;
use crate::status::statuses;

/// Delivery attempts per alert, and the first delay between them (doubling).
const ATTEMPTS: u32 = 4;
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Time allowed for one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Sends alerts to one webhook URL.
pub struct Webhook {
    url: hyper::Uri,
    client: Client,
}

impl Webhook {
    /// A client for `url` (http or https; TLS checks the system's roots).
    pub fn new(url: &str) -> Result<Webhook, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("webhook URL is invalid: {e}"))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("cannot load the system's TLS root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Webhook { url: uri, client })
    }

    /// Posts `payload`, retrying with backoff; returns the last error.
    pub async fn send(&self, payload: &Value) -> Result<(), String> {
        let body = Bytes::from(payload.to_string());
        let mut delay = FIRST_DELAY;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.post(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
        Err(format!("webhook failed {ATTEMPTS} times; last: {last}"))
    }

    async fn post(&self, body: Bytes) -> Result<(), String> {
        let request = hyper::Request::post(self.url.clone())
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("lifeboat/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(POST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {} s", POST_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        let status = response.status();
        // Drain the body so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

/// What changed since the last alert, as payloads to send. Reads and
/// updates the alert state in the catalog.
pub fn transitions(agent: &Agent, now: chrono::DateTime<Utc>) -> Vec<Value> {
    let config = agent.config();
    let catalog = &agent.catalog;
    let mut out = Vec::new();
    let base = |kind: &str| json!({"kind": kind, "host": agent.host, "time": now.to_rfc3339()});
    // Objectives: alert on entering BREACHED and on leaving it.
    if let Ok(list) = statuses(&config, catalog, now) {
        for s in list {
            for (objective, health, actual, target) in [
                ("rpo", s.rpo, s.rpo_seconds, Some(s.rpo_target_seconds)),
                ("rto", s.rto, s.rto_seconds, s.rto_target_seconds),
            ] {
                let key = format!("alert:{objective}:{}", s.source);
                let breached = health == Health::Breached;
                let was = state_is(catalog, &key, "breached");
                if breached != was {
                    let mut v = base(if breached { "breached" } else { "recovered" });
                    v["source"] = json!(s.source);
                    v["objective"] = json!(objective);
                    v["actual_seconds"] = json!(actual);
                    v["target_seconds"] = json!(target);
                    out.push((key, if breached { "breached" } else { "ok" }, v));
                }
            }
        }
    }
    // Jobs: alert on the first failed run after a success, and on recovery.
    for job in crate::job_specs(&config) {
        let JobId { kind, source } = &job.id;
        let Ok(Some(last)) = catalog.last_run(*kind, source.as_deref()) else {
            continue;
        };
        let failing = matches!(last.outcome, Outcome::Failed | Outcome::TimedOut);
        let done = last.outcome != Outcome::Running;
        let key = format!("alert:job:{}", job.id);
        let was = state_is(catalog, &key, "failing");
        if done && failing != was {
            let mut v = base(if failing {
                "job_failed"
            } else {
                "job_recovered"
            });
            v["job"] = json!(job.id.to_string());
            v["outcome"] = json!(last.outcome.as_str());
            v["error"] = json!(last.error);
            v["attempt"] = json!(last.attempt);
            out.push((key, if failing { "failing" } else { "ok" }, v));
        }
    }
    out.into_iter()
        .map(|(key, state, payload)| {
            if let Err(e) = catalog.set_state(&key, state) {
                log::warn!("cannot record alert state {key}: {e}");
            }
            payload
        })
        .collect()
}

fn state_is(catalog: &Catalog, key: &str, value: &str) -> bool {
    matches!(catalog.state(key), Ok(Some(v)) if v == value)
}

/// How often objectives and job outcomes are compared with what was last
/// alerted.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(10);

/// Evaluates transitions every [`EVALUATE_EVERY`] and posts them, until
/// `stop` resolves. Without a webhook, transitions are only logged.
pub async fn run(agent: Arc<Agent>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        let a = agent.clone();
        let payloads = tokio::task::spawn_blocking(move || transitions(&a, Utc::now()))
            .await
            .unwrap_or_default();
        let url = agent.config().agent.webhook.clone();
        let webhook = url.as_deref().map(Webhook::new);
        for payload in payloads {
            log::warn!("alert: {payload}");
            match &webhook {
                Some(Ok(hook)) => {
                    if let Err(e) = hook.send(&payload).await {
                        log::error!("alert not delivered: {e}");
                    }
                }
                Some(Err(e)) => log::error!("alert not delivered: {e}"),
                None => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVALUATE_EVERY) => {}
            _ = &mut stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server answering `statuses` in order, capturing bodies.
    async fn server(statuses: Vec<u16>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let handle = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for status in statuses {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read headers and the body (Content-Length bytes).
                loop {
                    let n = sock.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            bodies.push(body.to_string());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                sock.write_all(reply.as_bytes()).await.unwrap();
            }
            bodies
        });
        (url, handle)
    }

    #[tokio::test(start_paused = false)]
    async fn a_webhook_is_retried_until_it_accepts_the_alert() {
        let (url, server) = server(vec![503, 200]).await;
        let hook = Webhook::new(&url).unwrap();
        let payload = json!({"kind": "breached", "source": "db"});
        tokio::time::timeout(Duration::from_secs(20), hook.send(&payload))
            .await
            .unwrap()
            .unwrap();
        let bodies = server.await.unwrap();
        assert_eq!(bodies.len(), 2);
        assert_eq!(serde_json::from_str::<Value>(&bodies[1]).unwrap(), payload);
    }

    #[test]
    fn breaches_and_failures_alert_once_and_again_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[repository]\nlocation = \"{0}/repo\"\n[passphrase]\nenv = \"X\"\n\
             [agent]\nstate_dir = \"{0}/state\"\n\
             [[source]]\nname = \"db\"\npaths = [\"/srv\"]\nschedule = \"@hourly\"\nrpo = \"2h\"\n",
            dir.path().display()
        );
        let config = crate::config::Config::parse(&text, &dir.path().join("c.toml")).unwrap();
        let catalog = Arc::new(Catalog::open(&dir.path().join("catalog.sqlite")).unwrap());
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let agent = Agent::new(config, catalog.clone(), rx);
        let now = Utc::now();
        let snapshot = |age_h: i64, id: &str| crate::catalog::SnapshotRecord {
            id: id.into(),
            source: "db".into(),
            time: now - chrono::Duration::hours(age_h),
            bytes_added: 1,
            total_bytes: 1,
            files: 1,
            incomplete: false,
        };
        catalog.record_snapshot(&snapshot(3, "old")).unwrap();
        let kinds = |v: Vec<Value>| -> Vec<String> {
            v.iter()
                .map(|p| p["kind"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(kinds(transitions(&agent, now)), ["breached"]);
        assert!(transitions(&agent, now).is_empty(), "a breach alerts once");
        catalog.record_snapshot(&snapshot(0, "new")).unwrap();
        assert_eq!(kinds(transitions(&agent, now)), ["recovered"]);
        let fail = |outcome| {
            let id = catalog
                .start_run(crate::catalog::JobKind::Backup, Some("db"), now, 1)
                .unwrap();
            catalog
                .finish_run(id, now, outcome, 0, None, Some("disk full"))
                .unwrap();
        };
        fail(Outcome::Failed);
        let alerts = transitions(&agent, now);
        assert_eq!(kinds(alerts.clone()), ["job_failed"]);
        assert_eq!(alerts[0]["error"], "disk full");
        fail(Outcome::Failed);
        assert!(
            transitions(&agent, now).is_empty(),
            "a failing job alerts once"
        );
        fail(Outcome::Success);
        assert_eq!(kinds(transitions(&agent, now)), ["job_recovered"]);
    }

    #[test]
    fn a_bad_webhook_url_is_refused() {
        assert!(Webhook::new("not a url").is_err());
    }
}
