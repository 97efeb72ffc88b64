//! The scheduler: decides when each job runs, and runs it within limits.
//!
//! Shaped like mini-redis's server loop: one task owns all scheduling state
//! and waits in `select!` for the earliest due time, a finished job, a
//! request (run a job now, replace the job list after a reload) or shutdown.
//! Jobs run as tasks behind one semaphore per class, so a long check or
//! drill can never hold up a backup, and a job is never started while a run
//! of it is still going.
//!
//! Time comes from a [`Clock`], so tests run the scheduler under tokio's
//! paused time: [`TokioClock`] is wall time that advances with tokio's
//! clock. Rules:
//!
//! * A job's next run is the first schedule slot after now, plus a random
//!   per-host splay fixed at start-up (a fleet of hosts on one schedule
//!   does not hit the bucket in the same second).
//! * Missed runs (the host was down) run once at start-up, not once per
//!   missed slot. A backup that never ran runs at start-up too: its RPO is
//!   unknown until it does.
//! * A failed run is retried with exponential backoff (1 min, doubling, at
//!   most 1 h) as long as the retry comes before the next regular slot; the
//!   regular slot runs whatever happened before.
//! * A slot that comes while the job still runs is skipped, and logged.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Local, Utc};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::catalog::{JobKind, Outcome};
use crate::config::Schedule;

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Wall time that advances with tokio's clock, so tests can pause and
/// advance time.
#[derive(Debug)]
pub struct TokioClock {
    base: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `base` now.
    pub fn starting_at(base: DateTime<Utc>) -> TokioClock {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        self.base + chrono::Duration::from_std(self.start.elapsed()).unwrap_or_default()
    }
}

/// Names a job: its kind and, for backups (and drills), its source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId {
    /// What the job does.
    pub kind: JobKind,
    /// The source it is about, if any.
    pub source: Option<String>,
}

impl JobId {
    /// The backup job of a source.
    pub fn backup(source: &str) -> JobId {
        JobId {
            kind: JobKind::Backup,
            source: Some(source.to_string()),
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}:{s}", self.kind.as_str()),
            None => f.write_str(self.kind.as_str()),
        }
    }
}

impl FromStr for JobId {
    type Err = String;

    /// Parses `backup:NAME`, `drill:NAME`, `retention` or `check`.
    fn from_str(s: &str) -> Result<JobId, String> {
        let (kind, source) = match s.split_once(':') {
            Some((k, src)) => (k, Some(src.to_string())),
            None => (s, None),
        };
        let kind: JobKind = kind.parse().map_err(|_| {
            format!("unknown job {s:?}: use backup:SOURCE, retention, check or drill:NAME")
        })?;
        match (kind, &source) {
            (JobKind::Backup | JobKind::Drill, None) => {
                Err(format!("job {s:?} needs a name: {}:NAME", kind.as_str()))
            }
            (JobKind::Retention | JobKind::Check, Some(_)) => {
                Err(format!("job {s:?} takes no name: just {}", kind.as_str()))
            }
            _ => Ok(JobId { kind, source }),
        }
    }
}

/// Which concurrency limit a job counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Backups.
    Backup,
    /// Retention, checks and drills.
    Maintenance,
}

/// One schedulable job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Its name.
    pub id: JobId,
    /// When it runs.
    pub schedule: Schedule,
    /// How long one run may take.
    pub timeout: Duration,
    /// Its concurrency class.
    pub class: Class,
}

/// What a job reports while it runs (streamed to a `lifeboat run` client).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The job started (after waiting for its concurrency slot).
    Started {
        /// The job.
        job: String,
        /// Its attempt number (1 for a scheduled or requested run).
        attempt: u32,
    },
    /// Progress of a backup.
    Progress {
        /// Files read so far.
        files: u64,
        /// Bytes read so far.
        bytes_read: u64,
        /// Bytes added to the repository so far.
        bytes_stored: u64,
    },
    /// The job ended.
    Finished {
        /// How it ended.
        outcome: Outcome,
        /// The snapshot a backup saved.
        snapshot: Option<String>,
        /// What went wrong.
        error: Option<String>,
    },
}

/// How a run ended, as the runner reports it.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Success, failure, timeout or interruption.
    pub outcome: Outcome,
    /// The snapshot a backup saved.
    pub snapshot: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

/// A boxed future, so runners can be trait objects.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs jobs. The agent's runner drives the core engines; tests use fakes.
pub trait Runner: Send + Sync + 'static {
    /// Runs one attempt of `job`, sending events to `events` if given. The
    /// scheduler applies the job's timeout around the returned future.
    fn run(
        &self,
        job: JobSpec,
        attempt: u32,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> BoxFuture<RunResult>;
}

/// What the scheduler can be asked while it runs.
pub enum Request {
    /// Run a job now (unless it is running); events stream to `events`.
    RunNow {
        /// The job.
        job: JobId,
        /// Where its events go.
        events: mpsc::UnboundedSender<Event>,
        /// Whether it was started, or why not.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Replace the job list (after a configuration reload). Running jobs
    /// finish; jobs that remain keep their next run time.
    Replace(Vec<JobSpec>),
    /// The next run of every job, for status text.
    NextRuns(oneshot::Sender<Vec<(JobId, DateTime<Utc>, bool)>>),
}

/// Scheduler settings.
pub struct Settings {
    /// Concurrent backups.
    pub max_backups: usize,
    /// Concurrent maintenance jobs.
    pub max_maintenance: usize,
    /// Upper bound of the random delay added to each job's slots.
    pub splay: Duration,
    /// When each job last started, from the catalog (for catch-up).
    pub last_started: HashMap<JobId, DateTime<Utc>>,
    /// Unix time of the scheduler's last wake-up, for the readiness check.
    pub tick: Arc<AtomicI64>,
}

/// Longest the loop sleeps: it wakes at least this often to show it is
/// alive (`/readyz`) and to notice wall-clock jumps.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// First retry delay after a failure; doubles per attempt up to `MAX_RETRY_DELAY`.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(60);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

struct JobState {
    spec: JobSpec,
    splay: Duration,
    next: DateTime<Utc>,
    retry_at: Option<DateTime<Utc>>,
    attempt: u32,
    running: bool,
}

impl JobState {
    fn due(&self) -> DateTime<Utc> {
        match self.retry_at {
            Some(r) if r < self.next => r,
            _ => self.next,
        }
    }
}

/// The next regular slot of `schedule` after `after`, plus `splay`.
fn next_slot(schedule: &Schedule, after: DateTime<Utc>, splay: Duration) -> DateTime<Utc> {
    let local = after.with_timezone(&Local);
    match schedule.next_after(local) {
        Some(t) => t.with_timezone(&Utc) + chrono::Duration::from_std(splay).unwrap_or_default(),
        // A schedule with no future slot (a fixed past date): never again.
        None => DateTime::<Utc>::MAX_UTC,
    }
}

fn to_std(d: chrono::Duration) -> Duration {
    d.to_std().unwrap_or(Duration::ZERO)
}

/// Runs the scheduler until `shutdown` resolves, then waits up to `grace`
/// for running jobs. Returns the jobs still running when it gave up on them.
pub async fn run(
    jobs: Vec<JobSpec>,
    settings: Settings,
    clock: Arc<dyn Clock>,
    runner: Arc<dyn Runner>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Vec<JobId> {
    let backups = Arc::new(Semaphore::new(settings.max_backups.max(1)));
    let maintenance = Arc::new(Semaphore::new(settings.max_maintenance.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(JobId, RunResult)>();
    let mut states: HashMap<JobId, JobState> = HashMap::new();
    let now = clock.now();
    for spec in jobs {
        let state = initial_state(spec, now, &settings);
        states.insert(state.spec.id.clone(), state);
    }
    let start = Context {
        clock: clock.clone(),
        runner,
        backups,
        maintenance,
        done: done_tx,
    };
    tokio::pin!(shutdown);
    loop {
        let now = clock.now();
        settings.tick.store(now.timestamp(), Ordering::Relaxed);
        // Start everything that is due.
        let mut due: Vec<JobId> = states
            .values()
            .filter(|s| s.due() <= now)
            .map(|s| s.spec.id.clone())
            .collect();
        due.sort();
        for id in due {
            let state = states.get_mut(&id).expect("listed above");
            let regular = state.next <= now;
            if regular {
                state.next = next_slot(&state.spec.schedule, now, state.splay);
            }
            if state.running {
                log::warn!("{id}: a run is still going; skipping this slot");
                if !regular {
                    state.retry_at = None;
                }
                continue;
            }
            let attempt = if regular { 1 } else { state.attempt + 1 };
            state.retry_at = None;
            state.attempt = attempt;
            state.running = true;
            start.spawn(state.spec.clone(), attempt, None);
        }
        let wake = states
            .values()
            .filter(|s| !s.running)
            .map(JobState::due)
            .min()
            .map(|t| to_std(t - now))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(wake) => {}
            Some((id, result)) = done_rx.recv() => {
                let now = clock.now();
                match states.get_mut(&id) {
                    Some(state) => {
                        state.running = false;
                        if state.next <= now {
                            log::warn!("{id}: skipped the slots that came while it ran");
                            state.next = next_slot(&state.spec.schedule, now, state.splay);
                        }
                        on_finished(state, &result, now);
                    }
                    None => log::info!("{id} finished after it was removed from the configuration"),
                }
            }
            Some(request) = requests.recv() => match request {
                Request::RunNow { job, events, reply } => {
                    let answer = match states.get_mut(&job) {
                        None => Err(format!("no job {job} in the configuration")),
                        Some(s) if s.running => Err(format!("{job} is already running")),
                        Some(s) => {
                            s.running = true;
                            s.attempt = 1;
                            s.retry_at = None;
                            start.spawn(s.spec.clone(), 1, Some(events));
                            Ok(())
                        }
                    };
                    let _ = reply.send(answer);
                }
                Request::Replace(jobs) => {
                    let now = clock.now();
                    let mut old = std::mem::take(&mut states);
                    for spec in jobs {
                        let state = match old.remove(&spec.id) {
                            Some(mut s) => {
                                if s.spec.schedule.as_str() != spec.schedule.as_str() {
                                    s.next = next_slot(&spec.schedule, now, s.splay);
                                }
                                s.spec = spec;
                                s
                            }
                            None => initial_state(spec, now, &settings),
                        };
                        states.insert(state.spec.id.clone(), state);
                    }
                    // Removed jobs still running finish on their own; their
                    // results then find no state and are only logged.
                }
                Request::NextRuns(reply) => {
                    let mut list: Vec<_> = states
                        .values()
                        .map(|s| (s.spec.id.clone(), s.due(), s.running))
                        .collect();
                    list.sort_by(|a, b| a.0.cmp(&b.0));
                    let _ = reply.send(list);
                }
            },
            _ = &mut shutdown => break,
        }
    }
    // Shutdown: take no more jobs; give running ones the grace period.
    let mut running: Vec<JobId> = states
        .values()
        .filter(|s| s.running)
        .map(|s| s.spec.id.clone())
        .collect();
    if !running.is_empty() {
        log::info!(
            "waiting up to {} s for {} running job(s)",
            grace.as_secs(),
            running.len()
        );
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !running.is_empty() {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((id, _))) => running.retain(|r| *r != id),
            Ok(None) | Err(_) => break,
        }
    }
    running.sort();
    running
}

fn initial_state(spec: JobSpec, now: DateTime<Utc>, settings: &Settings) -> JobState {
    let splay = if settings.splay.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_millis(rand::random::<u64>() % settings.splay.as_millis().max(1) as u64)
    };
    let missed = match settings.last_started.get(&spec.id) {
        Some(last) => next_slot(&spec.schedule, *last, Duration::ZERO) <= now,
        // A backup that never ran has an unknown RPO: run it now.
        None => spec.id.kind == JobKind::Backup,
    };
    let next = next_slot(&spec.schedule, now, splay);
    JobState {
        retry_at: missed.then(|| now + chrono::Duration::from_std(splay).unwrap_or_default()),
        spec,
        splay,
        next,
        attempt: 0,
        running: false,
    }
}

fn on_finished(state: &mut JobState, result: &RunResult, now: DateTime<Utc>) {
    let id = &state.spec.id;
    match result.outcome {
        Outcome::Success => state.attempt = 0,
        Outcome::Failed | Outcome::TimedOut => {
            let exp = state.attempt.saturating_sub(1).min(10);
            let delay = (FIRST_RETRY_DELAY * 2u32.pow(exp)).min(MAX_RETRY_DELAY);
            let retry = now + chrono::Duration::from_std(delay).unwrap_or_default();
            if retry < state.next {
                log::warn!(
                    "{id}: attempt {} failed ({}); retrying in {} s",
                    state.attempt,
                    result.error.as_deref().unwrap_or("no detail"),
                    delay.as_secs()
                );
                state.retry_at = Some(retry);
            } else {
                log::error!(
                    "{id}: attempt {} failed ({}); no retry fits before the next run at {}",
                    state.attempt,
                    result.error.as_deref().unwrap_or("no detail"),
                    state.next.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        Outcome::Interrupted | Outcome::Running => {}
    }
}

/// What starting a job needs.
struct Context {
    clock: Arc<dyn Clock>,
    runner: Arc<dyn Runner>,
    backups: Arc<Semaphore>,
    maintenance: Arc<Semaphore>,
    done: mpsc::UnboundedSender<(JobId, RunResult)>,
}

impl Context {
    /// Starts a job as a task: it waits for its class's slot, runs under
    /// its timeout, and reports to the scheduler.
    fn spawn(&self, spec: JobSpec, attempt: u32, events: Option<mpsc::UnboundedSender<Event>>) {
        let semaphore = match spec.class {
            Class::Backup => self.backups.clone(),
            Class::Maintenance => self.maintenance.clone(),
        };
        let runner = self.runner.clone();
        let done = self.done.clone();
        let clock = self.clock.clone();
        tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let id = spec.id.clone();
            let timeout = spec.timeout;
            log::info!("{id}: starting (attempt {attempt})");
            if let Some(events) = &events {
                let _ = events.send(Event::Started {
                    job: id.to_string(),
                    attempt,
                });
            }
            let started = clock.now();
            let result = match tokio::time::timeout(
                timeout,
                runner.run(spec, attempt, events.clone()),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => RunResult {
                    outcome: Outcome::TimedOut,
                    snapshot: None,
                    error: Some(format!(
                        "did not finish within its timeout of {} s",
                        timeout.as_secs()
                    )),
                },
            };
            let secs = to_std(clock.now() - started).as_secs_f64();
            match result.outcome {
                Outcome::Success => log::info!("{id}: succeeded in {secs:.1} s"),
                other => log::warn!(
                    "{id}: {} after {secs:.1} s: {}",
                    other.as_str(),
                    result.error.as_deref().unwrap_or("no detail")
                ),
            }
            if let Some(events) = events {
                let _ = events.send(Event::Finished {
                    outcome: result.outcome,
                    snapshot: result.snapshot.clone(),
                    error: result.error.clone(),
                });
            }
            let _ = done.send((id, result));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every start and holds each run for `hold`.
    struct FakeRunner {
        clock: Arc<TokioClock>,
        hold: Duration,
        starts: Mutex<Vec<(JobId, DateTime<Utc>, u32)>>,
        running: Mutex<HashMap<Class, usize>>,
        max_running: Mutex<HashMap<Class, usize>>,
        fail_first: Mutex<u32>,
    }

    impl FakeRunner {
        fn new(clock: Arc<TokioClock>, hold: Duration) -> Arc<FakeRunner> {
            Arc::new(FakeRunner {
                clock,
                hold,
                starts: Mutex::new(Vec::new()),
                running: Mutex::new(HashMap::new()),
                max_running: Mutex::new(HashMap::new()),
                fail_first: Mutex::new(0),
            })
        }

        fn starts_of(&self, id: &JobId) -> Vec<DateTime<Utc>> {
            self.starts
                .lock()
                .unwrap()
                .iter()
                .filter(|(j, _, _)| j == id)
                .map(|(_, t, _)| *t)
                .collect()
        }
    }

    impl std::hash::Hash for Class {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            (*self as u8).hash(state);
        }
    }

    impl Runner for Arc<FakeRunner> {
        fn run(
            &self,
            job: JobSpec,
            attempt: u32,
            _events: Option<mpsc::UnboundedSender<Event>>,
        ) -> BoxFuture<RunResult> {
            let me = self.clone();
            Box::pin(async move {
                me.starts
                    .lock()
                    .unwrap()
                    .push((job.id.clone(), me.clock.now(), attempt));
                {
                    let mut running = me.running.lock().unwrap();
                    let n = running.entry(job.class).or_default();
                    *n += 1;
                    let mut max = me.max_running.lock().unwrap();
                    let m = max.entry(job.class).or_default();
                    *m = (*m).max(*n);
                }
                tokio::time::sleep(me.hold).await;
                *me.running.lock().unwrap().get_mut(&job.class).unwrap() -= 1;
                let fail = {
                    let mut f = me.fail_first.lock().unwrap();
                    if *f > 0 {
                        *f -= 1;
                        true
                    } else {
                        false
                    }
                };
                RunResult {
                    outcome: if fail {
                        Outcome::Failed
                    } else {
                        Outcome::Success
                    },
                    snapshot: None,
                    error: fail.then(|| "injected".to_string()),
                }
            })
        }
    }

    fn spec(id: JobId, schedule: &str, class: Class) -> JobSpec {
        JobSpec {
            id,
            schedule: Schedule::parse(schedule).unwrap(),
            timeout: Duration::from_secs(3600),
            class,
        }
    }

    fn settings(last: HashMap<JobId, DateTime<Utc>>) -> Settings {
        Settings {
            max_backups: 1,
            max_maintenance: 1,
            splay: Duration::ZERO,
            last_started: last,
            tick: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Runs the scheduler for `span` of (paused) time and returns the runner.
    async fn run_for(
        jobs: Vec<JobSpec>,
        settings: Settings,
        hold: Duration,
        span: Duration,
        fail_first: u32,
        base: DateTime<Utc>,
    ) -> Arc<FakeRunner> {
        let clock = Arc::new(TokioClock::starting_at(base));
        let runner = FakeRunner::new(clock.clone(), hold);
        *runner.fail_first.lock().unwrap() = fail_first;
        let (_tx, rx) = mpsc::channel(4);
        run(
            jobs,
            settings,
            clock,
            Arc::new(runner.clone()),
            rx,
            tokio::time::sleep(span),
            Duration::from_secs(1),
        )
        .await;
        runner
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_run_at_their_schedule_slots() {
        let id = JobId::backup("etc");
        let last = HashMap::from([(id.clone(), at("2026-01-01T00:00:00Z"))]);
        let runner = run_for(
            vec![spec(id.clone(), "*/10 * * * * *", Class::Backup)],
            settings(last),
            Duration::from_millis(10),
            Duration::from_secs(35),
            0,
            at("2026-01-01T00:00:01Z"),
        )
        .await;
        let starts = runner.starts_of(&id);
        // The slot at 00:00:00 was taken by the last run; then 10, 20, 30.
        let secs: Vec<u32> = starts.iter().map(|t| t.timestamp() as u32 % 60).collect();
        assert_eq!(secs, [10, 20, 30], "{starts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn missed_runs_after_downtime_run_once_at_start() {
        let id = JobId::backup("etc");
        // Last run three days ago; an hourly schedule missed 72 slots.
        let last = HashMap::from([(id.clone(), at("2026-01-01T00:00:00Z"))]);
        let runner = run_for(
            vec![spec(id.clone(), "@hourly", Class::Backup)],
            settings(last),
            Duration::from_secs(1),
            Duration::from_secs(600),
            0,
            at("2026-01-04T00:30:00Z"),
        )
        .await;
        let starts = runner.starts_of(&id);
        assert_eq!(starts.len(), 1, "one catch-up run, not 72: {starts:?}");
        assert_eq!(starts[0], at("2026-01-04T00:30:00Z"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backup_that_never_ran_runs_at_start_but_maintenance_waits() {
        let backup = JobId::backup("etc");
        let check = JobId {
            kind: JobKind::Check,
            source: None,
        };
        let runner = run_for(
            vec![
                spec(backup.clone(), "@daily", Class::Backup),
                spec(check.clone(), "@daily", Class::Maintenance),
            ],
            settings(HashMap::new()),
            Duration::from_secs(1),
            Duration::from_secs(60),
            0,
            at("2026-01-04T10:00:00Z"),
        )
        .await;
        assert_eq!(runner.starts_of(&backup).len(), 1);
        assert!(runner.starts_of(&check).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_never_runs_twice_at_once() {
        let id = JobId::backup("slow");
        let last = HashMap::from([(id.clone(), at("2026-01-01T00:00:00Z"))]);
        // Every second, but each run takes 3.5 s: slots in between are skipped.
        let runner = run_for(
            vec![spec(id.clone(), "* * * * * *", Class::Backup)],
            settings(last),
            Duration::from_millis(3500),
            Duration::from_secs(10),
            0,
            at("2026-01-01T00:00:00.500Z"),
        )
        .await;
        let starts = runner.starts_of(&id);
        for pair in starts.windows(2) {
            assert!(
                pair[1] - pair[0] >= chrono::Duration::milliseconds(3500),
                "overlapping runs: {starts:?}"
            );
        }
        assert!(starts.len() >= 2, "{starts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limits_hold_per_class_and_maintenance_never_blocks_backups() {
        let last: HashMap<JobId, DateTime<Utc>> = HashMap::new();
        let jobs = vec![
            spec(JobId::backup("a"), "@daily", Class::Backup),
            spec(JobId::backup("b"), "@daily", Class::Backup),
            spec(JobId::backup("c"), "@daily", Class::Backup),
            spec(
                JobId {
                    kind: JobKind::Check,
                    source: None,
                },
                "* * * * * *",
                Class::Maintenance,
            ),
        ];
        let mut s = settings(last);
        s.max_backups = 2;
        let runner = run_for(
            jobs,
            s,
            Duration::from_secs(5),
            Duration::from_secs(30),
            0,
            at("2026-01-01T12:00:00Z"),
        )
        .await;
        let max = runner.max_running.lock().unwrap().clone();
        assert_eq!(max.get(&Class::Backup), Some(&2), "{max:?}");
        assert_eq!(max.get(&Class::Maintenance), Some(&1), "{max:?}");
        // The third backup started once a slot freed, 5 s in.
        let c = runner.starts_of(&JobId::backup("c"));
        assert_eq!(c, [at("2026-01-01T12:00:05Z")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_is_retried_with_backoff_before_the_next_slot() {
        let id = JobId::backup("flaky");
        let last = HashMap::from([(id.clone(), at("2026-01-01T00:00:00Z"))]);
        let runner = run_for(
            vec![spec(id.clone(), "@hourly", Class::Backup)],
            settings(last),
            Duration::from_secs(1),
            Duration::from_secs(1200),
            2,
            at("2026-01-01T00:59:00Z"),
        )
        .await;
        let starts = runner.starts_of(&id);
        // 01:00 fails, retry 1 min later fails, retry 2 min after that succeeds.
        assert_eq!(
            starts,
            [
                at("2026-01-01T01:00:00Z"),
                at("2026-01-01T01:01:01Z"),
                at("2026-01-01T01:03:02Z"),
            ]
        );
        let attempts: Vec<u32> = runner
            .starts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, a)| *a)
            .collect();
        assert_eq!(attempts, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn run_now_starts_a_job_and_refuses_one_already_running() {
        let id = JobId::backup("etc");
        let last = HashMap::from([(id.clone(), at("2026-01-01T00:00:00Z"))]);
        let clock = Arc::new(TokioClock::starting_at(at("2026-01-01T00:10:00Z")));
        let runner = FakeRunner::new(clock.clone(), Duration::from_secs(5));
        let (tx, rx) = mpsc::channel(4);
        let sched = tokio::spawn(run(
            vec![spec(id.clone(), "@daily", Class::Backup)],
            settings(last),
            clock,
            Arc::new(runner.clone()),
            rx,
            tokio::time::sleep(Duration::from_secs(20)),
            Duration::from_secs(1),
        ));
        let ask = |job: JobId| {
            let tx = tx.clone();
            async move {
                let (events, mut events_rx) = mpsc::unbounded_channel();
                let (reply, answer) = oneshot::channel();
                tx.send(Request::RunNow { job, events, reply })
                    .await
                    .unwrap();
                (
                    answer.await.unwrap(),
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        while let Some(e) = events_rx.recv().await {
                            seen.push(e);
                        }
                        seen
                    }),
                )
            }
        };
        let (first, events) = ask(id.clone()).await;
        assert_eq!(first, Ok(()));
        let (second, _) = ask(id.clone()).await;
        assert!(second.unwrap_err().contains("already running"));
        let (unknown, _) = ask(JobId::backup("nope")).await;
        assert!(unknown.unwrap_err().contains("no job"));
        let events = events.await.unwrap();
        assert!(
            matches!(
                events.last(),
                Some(Event::Finished {
                    outcome: Outcome::Success,
                    ..
                })
            ),
            "{events:?}"
        );
        assert!(sched.await.unwrap().is_empty());
        assert_eq!(runner.starts_of(&id).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_running_jobs_only_up_to_the_grace_period() {
        let id = JobId::backup("long");
        let clock = Arc::new(TokioClock::starting_at(at("2026-01-01T00:00:00Z")));
        let runner = FakeRunner::new(clock.clone(), Duration::from_secs(600));
        let (_tx, rx) = mpsc::channel(4);
        let started = tokio::time::Instant::now();
        let left = run(
            vec![spec(id.clone(), "@daily", Class::Backup)],
            settings(HashMap::new()),
            clock,
            Arc::new(runner.clone()),
            rx,
            tokio::time::sleep(Duration::from_secs(2)),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(left, [id]);
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[test]
    fn job_ids_parse_and_print() {
        for s in ["backup:etc", "retention", "check", "drill:db"] {
            assert_eq!(s.parse::<JobId>().unwrap().to_string(), s);
        }
        assert!("backup"
            .parse::<JobId>()
            .unwrap_err()
            .contains("needs a name"));
        assert!("check:x"
            .parse::<JobId>()
            .unwrap_err()
            .contains("takes no name"));
        assert!("explode"
            .parse::<JobId>()
            .unwrap_err()
            .contains("unknown job"));
    }
}
