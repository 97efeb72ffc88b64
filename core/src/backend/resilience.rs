//! Retries, a circuit breaker, a concurrency limit, deadlines and fault
//! injection, each as a wrapper around any [`Backend`].
//!
//! Cross-cutting behaviour lives here rather than in each store, in the manner
//! of restic's `internal/backend/{retry,limiter,sema}`: a wrapper is itself a
//! `Backend`, so the same retry logic serves the local directory, S3 and
//! whatever comes next, and each piece is tested once, on its own, with the
//! in-memory store and the [`Faulty`] injector underneath. Every operation a
//! wrapper repeats or abandons is safe to repeat because the contract makes
//! `put` put-if-absent under content-derived or random names, `delete`
//! idempotent, and everything else a read.
//!
//! [`resilient`] stacks them, outermost first: [`Retry`] → [`CircuitBreaker`]
//! → [`Limiter`] → [`Timeout`] → store. Retry is outermost so that its
//! back-off sleeps hold no concurrency slot and no request thread. The breaker
//! sits under it so that it sees, and counts, every single attempt, and so
//! that while it is open the retry loop's attempts are answered at once
//! instead of queueing. The limiter comes next so that only calls the breaker
//! admitted wait for a slot. The deadline is innermost so that it starts when
//! the request really leaves, not while the call waits in the limiter.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Backend, BackendError, ObjectInfo, PutOutcome};

/// The key reported by errors of [`Backend::remove_stale_temp_files`], which
/// is about no single object.
const MAINTENANCE_KEY: &str = "<stale temporary files>";

fn temporary(key: &str, message: String) -> BackendError {
    BackendError::Temporary {
        key: key.to_string(),
        message,
    }
}

/// Implements every [`Backend`] operation of a wrapper type by handing a
/// closure over the inner store to the wrapper's `call` method, so that each
/// wrapper states its behaviour once instead of six times. Each impl adds its
/// own `concurrency`, the one operation that is not a call into the store.
macro_rules! forward_through_call {
    () => {
        fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
            self.call(key, |b| b.put(key, data))
        }
        fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
            self.call(key, |b| b.get(key, range.clone()))
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
            self.call(prefix, |b| b.list(prefix))
        }
        fn delete(&self, key: &str) -> Result<(), BackendError> {
            self.call(key, |b| b.delete(key))
        }
        fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
            self.call(key, |b| b.stat(key))
        }
        fn location(&self) -> String {
            self.inner.location()
        }
        fn exclusive_create(&self) -> bool {
            self.inner.exclusive_create()
        }
        fn remove_stale_temp_files(
            &self,
            older_than: Duration,
            now: std::time::SystemTime,
        ) -> Result<usize, BackendError> {
            self.call(MAINTENANCE_KEY, |b| {
                b.remove_stale_temp_files(older_than, now)
            })
        }
        fn object_lock(&self) -> bool {
            self.inner.object_lock()
        }
        fn put_retained(
            &self,
            key: &str,
            data: &[u8],
            retention: &super::Retention,
        ) -> Result<PutOutcome, BackendError> {
            self.call(key, |b| b.put_retained(key, data, retention))
        }
        fn extend_retention(
            &self,
            key: &str,
            retention: &super::Retention,
        ) -> Result<(), BackendError> {
            self.call(key, |b| b.extend_retention(key, retention))
        }
        fn retained_until(&self, key: &str) -> Result<super::Retained, BackendError> {
            self.call(key, |b| b.retained_until(key))
        }
        fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
            self.call(key, |b| b.put_replacing(key, data))
        }
        fn put_shared(
            &self,
            key: &str,
            data: bytes::Bytes,
            retention: Option<&super::Retention>,
        ) -> Result<PutOutcome, BackendError> {
            // A clone per attempt shares the bytes; it copies nothing.
            self.call(key, |b| b.put_shared(key, data.clone(), retention))
        }
    };
}

// ---------------------------------------------------------------- retry ---

/// How [`Retry`] repeats temporary failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (0 is treated as 1).
    pub max_attempts: u32,
    /// The ceiling of the first back-off sleep; each later ceiling doubles.
    pub base_delay: Duration,
    /// The largest back-off ceiling.
    pub max_delay: Duration,
    /// No sleep starts that would end later than this after the first attempt.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // Enough attempts that the time budget, not the count, ends a long
        // outage: at the 10 s ceiling, 20 attempts span about two minutes.
        Self {
            max_attempts: 20,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

/// Repeats calls that fail with [`BackendError::Temporary`], with exponential
/// back-off and full jitter; other errors and successes return at once.
///
/// A put whose first attempt landed but whose reply was lost reports
/// [`PutOutcome::AlreadyExists`] on the retry. That is a success: names are
/// content-derived or random, so the object there is the one we wrote, and
/// callers already treat both outcomes alike, so it is returned unchanged.
#[derive(Debug)]
pub struct Retry {
    inner: Arc<dyn Backend>,
    policy: RetryPolicy,
}

impl Retry {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    fn call<T>(
        &self,
        key: &str,
        op: impl Fn(&dyn Backend) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let start = Instant::now();
        let max_attempts = self.policy.max_attempts.max(1);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let message = match op(&*self.inner) {
                Err(BackendError::Temporary { message, .. }) => message,
                other => return other,
            };
            let sleep = self.backoff(attempt);
            let elapsed = start.elapsed();
            // Giving up before a sleep that would overrun the budget, rather
            // than after it, keeps the whole call inside `max_elapsed`.
            if attempt >= max_attempts || elapsed + sleep > self.policy.max_elapsed {
                let plural = if attempt == 1 { "" } else { "s" };
                return Err(temporary(
                    key,
                    format!(
                        "gave up after {attempt} attempt{plural} in {:.1} s: {message}",
                        elapsed.as_secs_f64()
                    ),
                ));
            }
            log::debug!(
                "{}: attempt {attempt} on {key} failed ({message}); retrying in {:.3} s",
                self.inner.location(),
                sleep.as_secs_f64()
            );
            RETRIES_TOTAL.fetch_add(1, SeqCst);
            thread::sleep(sleep);
        }
    }

    /// Full jitter: a uniform draw below the exponential ceiling. Spreading
    /// sleeps over the whole interval keeps many clients that failed together
    /// from retrying together and knocking the store over again.
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        let ceiling = self
            .policy
            .base_delay
            .saturating_mul(factor)
            .min(self.policy.max_delay);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
    }
}

impl Backend for Retry {
    forward_through_call!();
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
    fn prefetch(&self, key: &str) {
        self.inner.prefetch(key)
    }
}

/// Retries made by every [`Retry`] in this process (for metrics: the
/// agent opens a store per job, and the count must not restart with each).
static RETRIES_TOTAL: AtomicU64 = AtomicU64::new(0);
/// Times any [`CircuitBreaker`] in this process opened.
static BREAKER_OPENED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Retries of temporary storage errors made in this process so far.
pub fn retries_total() -> u64 {
    RETRIES_TOTAL.load(SeqCst)
}

/// Times a storage circuit breaker opened in this process so far.
pub fn breaker_opened_total() -> u64 {
    BREAKER_OPENED_TOTAL.load(SeqCst)
}

// -------------------------------------------------------- circuit breaker ---

/// When [`CircuitBreaker`] opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive temporary failures that open the breaker (0 is treated as 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open the first time.
    pub cool_down: Duration,
    /// The longest it stays open after repeated failed probes.
    pub max_cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(2),
            max_cool_down: Duration::from_secs(60),
        }
    }
}

/// The state of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through to the store.
    Closed,
    /// Calls fail fast without reaching the store until the cool-down ends.
    Open,
    /// One probe call is in flight; every other call fails fast.
    HalfOpen,
}

#[derive(Debug)]
struct BreakerCore {
    state: BreakerState,
    /// Consecutive temporary failures seen from the store.
    failures: u32,
    /// How long the next opening lasts.
    cool_down: Duration,
    /// While open: when the next probe may go.
    probe_at: Instant,
}

#[derive(Debug)]
struct BreakerShared {
    location: String,
    policy: BreakerPolicy,
    core: Mutex<BreakerCore>,
    times_opened: AtomicU64,
}

impl BreakerShared {
    fn lock(&self) -> MutexGuard<'_, BreakerCore> {
        // The core is consistent after every statement, so a poisoned lock
        // (a panic elsewhere while holding it) leaves nothing to repair.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets a call through, as a probe if the cool-down just ended, or
    /// answers for the store with the error that says why not.
    fn admit(&self, key: &str) -> Result<bool, BackendError> {
        let mut core = self.lock();
        let now = Instant::now();
        let state = core.state;
        match state {
            BreakerState::Closed => Ok(false),
            BreakerState::Open if now >= core.probe_at => {
                core.state = BreakerState::HalfOpen;
                log::info!(
                    "circuit breaker for {}: half-open, sending one probe request",
                    self.location
                );
                Ok(true)
            }
            BreakerState::Open => Err(temporary(
                key,
                format!(
                    "circuit breaker open: {} failed {} times in a row; next probe in {:.1} s",
                    self.location,
                    core.failures,
                    (core.probe_at - now).as_secs_f64()
                ),
            )),
            BreakerState::HalfOpen => Err(temporary(
                key,
                format!(
                    "circuit breaker half-open: {} failed {} times in a row; a probe is in flight",
                    self.location, core.failures
                ),
            )),
        }
    }

    /// Books the outcome of an admitted call. Only calls admitted while
    /// closed and the probe change the state; a straggler admitted before the
    /// breaker opened proves little about the store now.
    fn record(&self, probe: bool, failed: bool) {
        let mut core = self.lock();
        if !failed {
            if probe || core.state == BreakerState::Closed {
                if core.state != BreakerState::Closed {
                    log::info!(
                        "circuit breaker for {}: closed, the store answers again",
                        self.location
                    );
                }
                core.state = BreakerState::Closed;
                core.failures = 0;
                core.cool_down = self.policy.cool_down;
            }
            return;
        }
        core.failures = core.failures.saturating_add(1);
        if probe {
            // Each failed probe doubles the wait, so a store that is down for
            // long is probed rarely instead of every couple of seconds.
            core.cool_down = core
                .cool_down
                .saturating_mul(2)
                .min(self.policy.max_cool_down);
            self.open(&mut core);
        } else if core.state == BreakerState::Closed
            && core.failures >= self.policy.failure_threshold.max(1)
        {
            self.open(&mut core);
        }
    }

    fn open(&self, core: &mut BreakerCore) {
        core.state = BreakerState::Open;
        // Checked, so an absurd policy value cannot panic while the lock is held.
        let now = Instant::now();
        core.probe_at = now
            .checked_add(core.cool_down)
            .unwrap_or(now + Duration::from_secs(86_400));
        let times = self.times_opened.fetch_add(1, SeqCst) + 1;
        BREAKER_OPENED_TOTAL.fetch_add(1, SeqCst);
        log::warn!(
            "circuit breaker for {}: open after {} consecutive failures; failing fast for {:.1} s (opened {times} times)",
            self.location,
            core.failures,
            core.cool_down.as_secs_f64()
        );
    }
}

/// Settles an admitted call exactly once, even if the store panics: an
/// unsettled probe would otherwise leave the breaker half-open for good.
struct Ticket<'a> {
    shared: &'a BreakerShared,
    probe: bool,
    settled: bool,
}

impl Ticket<'_> {
    fn settle(mut self, failed: bool) {
        self.settled = true;
        self.shared.record(self.probe, failed);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.record(self.probe, true);
        }
    }
}

/// Stops calling a store that keeps failing, so that a dead store costs each
/// caller one quick error instead of a full retry budget of timeouts.
///
/// Consecutive [`BackendError::Temporary`] failures open it; successes,
/// `NotFound` and `Permanent` errors reset the count, because they prove the
/// store answers. Once open, calls fail fast with a temporary error until the
/// cool-down ends; then one call goes through as a probe. A successful probe
/// closes the breaker and resets the cool-down; a failed one re-opens it with
/// the cool-down doubled, up to the policy's maximum.
#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Arc<dyn Backend>,
    shared: Arc<BreakerShared>,
}

impl CircuitBreaker {
    /// Wraps `inner`, closed.
    pub fn new(inner: Arc<dyn Backend>, policy: BreakerPolicy) -> Self {
        let core = BreakerCore {
            state: BreakerState::Closed,
            failures: 0,
            cool_down: policy.cool_down,
            probe_at: Instant::now(),
        };
        let shared = Arc::new(BreakerShared {
            location: inner.location(),
            policy,
            core: Mutex::new(core),
            times_opened: AtomicU64::new(0),
        });
        Self { inner, shared }
    }

    /// A handle that observes this breaker after it has been wrapped in others.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle(Arc::clone(&self.shared))
    }

    /// The current state. An open breaker whose cool-down has ended still
    /// reads `Open` until the next call becomes the probe.
    pub fn state(&self) -> BreakerState {
        self.shared.lock().state
    }

    /// How many times the breaker has opened, re-openings after a failed
    /// probe included.
    pub fn times_opened(&self) -> u64 {
        self.shared.times_opened.load(SeqCst)
    }

    fn call<T>(
        &self,
        key: &str,
        op: impl FnOnce(&dyn Backend) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let ticket = Ticket {
            shared: &self.shared,
            probe: self.shared.admit(key)?,
            settled: false,
        };
        let result = op(&*self.inner);
        ticket.settle(matches!(result, Err(BackendError::Temporary { .. })));
        result
    }
}

impl Backend for CircuitBreaker {
    forward_through_call!();
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
    fn prefetch(&self, key: &str) {
        self.inner.prefetch(key)
    }
}

/// Observes a [`CircuitBreaker`] from outside the stack that owns it.
#[derive(Debug, Clone)]
pub struct BreakerHandle(Arc<BreakerShared>);

impl BreakerHandle {
    /// See [`CircuitBreaker::state`].
    pub fn state(&self) -> BreakerState {
        self.0.lock().state
    }

    /// See [`CircuitBreaker::times_opened`].
    pub fn times_opened(&self) -> u64 {
        self.0.times_opened.load(SeqCst)
    }
}

// -------------------------------------------------------------- limiter ---

/// A bulkhead: at most `max_in_flight` calls run in the inner store at once;
/// the rest wait their turn. This keeps many engine threads from opening more
/// connections than the store (or the uplink) serves well.
#[derive(Debug)]
pub struct Limiter {
    inner: Arc<dyn Backend>,
    max_in_flight: usize,
    in_flight: Mutex<usize>,
    freed: Condvar,
}

/// One slot of a [`Limiter`], given back when dropped, also on panic.
struct Permit<'a>(&'a Limiter);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
        self.0.freed.notify_one();
    }
}

impl Limiter {
    /// Wraps `inner`, allowing `max_in_flight` calls at once (0 is treated as 1).
    pub fn new(inner: Arc<dyn Backend>, max_in_flight: usize) -> Self {
        Self {
            inner,
            max_in_flight: max_in_flight.max(1),
            in_flight: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call<T>(
        &self,
        _key: &str,
        op: impl FnOnce(&dyn Backend) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut n = self.lock();
        while *n >= self.max_in_flight {
            n = self.freed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        drop(n);
        let _permit = Permit(self);
        op(&*self.inner)
    }
}

impl Backend for Limiter {
    forward_through_call!();
    /// The store's own preference, capped by the bound: engines sizing
    /// their pools above the bound would only have threads queueing here.
    fn concurrency(&self) -> usize {
        self.max_in_flight.min(self.inner.concurrency())
    }
    /// A hint takes no slot: it only lets the store start early.
    fn prefetch(&self, key: &str) {
        self.inner.prefetch(key)
    }
}

// -------------------------------------------------------------- timeout ---

/// Above this many abandoned requests still running, [`Timeout`] stops
/// starting new ones: the store is not answering, and each hung request
/// holds a thread and perhaps a connection.
const MAX_HUNG: usize = 64;

/// A list is many paged requests under one call, so it gets this many
/// per-request deadlines; a large healthy listing must not be cut.
const LIST_DEADLINE_FACTOR: u32 = 10;

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

/// Marks a request thread finished when dropped (panics included), and
/// takes it off the hung count if its caller had given up on it.
struct Finish {
    state: Arc<AtomicU8>,
    hung: Arc<AtomicUsize>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if self
            .state
            .compare_exchange(RUNNING, DONE, SeqCst, SeqCst)
            .is_err()
        {
            self.hung.fetch_sub(1, SeqCst);
        }
    }
}

/// Gives every call a deadline of `per_request` plus its size at
/// `bytes_per_sec`, so a hung connection becomes a temporary error the
/// retry layer can act on instead of a backup that never ends.
///
/// A synchronous call cannot be cancelled, so each runs on its own thread
/// and is abandoned on timeout; it finishes in the background, which is safe
/// because puts are put-if-absent and everything else is idempotent. A store
/// that cancels natively (the S3 backend drops its future) should prefer its
/// own deadline. Abandoned requests still occupy the store after their
/// [`Limiter`] slot is freed, which is why their number is capped.
#[derive(Debug)]
pub struct Timeout {
    inner: Arc<dyn Backend>,
    per_request: Duration,
    bytes_per_sec: u64,
    hung: Arc<AtomicUsize>,
}

impl Timeout {
    /// Wraps `inner`. A `bytes_per_sec` of 0 gives every call `per_request`.
    pub fn new(inner: Arc<dyn Backend>, per_request: Duration, bytes_per_sec: u64) -> Self {
        Self {
            inner,
            per_request,
            bytes_per_sec,
            hung: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn deadline(&self, size: u64) -> Duration {
        if self.bytes_per_sec == 0 {
            return self.per_request;
        }
        let transfer = Duration::try_from_secs_f64(size as f64 / self.bytes_per_sec as f64)
            .unwrap_or(Duration::MAX);
        self.per_request.saturating_add(transfer)
    }

    fn run<T: Send + 'static>(
        &self,
        key: &str,
        deadline: Duration,
        op: impl FnOnce(&dyn Backend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let hung = self.hung.load(SeqCst);
        if hung > MAX_HUNG {
            return Err(temporary(
                key,
                format!("store not answering: {hung} requests still hung"),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(AtomicU8::new(RUNNING));
        let finish = Finish {
            state: Arc::clone(&state),
            hung: Arc::clone(&self.hung),
        };
        let inner = Arc::clone(&self.inner);
        let spawned = thread::Builder::new()
            .name("lifeboat-io".to_string())
            .spawn(move || {
                // Dropped after the send, so a thread marked done has always
                // sent its result (or panicked, dropping the sender).
                let _finish = finish;
                let _ = tx.send(op(&*inner));
            });
        if let Err(e) = spawned {
            return Err(temporary(
                key,
                format!("could not start an I/O thread: {e}"),
            ));
        }
        let panicked = || BackendError::Permanent {
            key: key.to_string(),
            message: "the request thread panicked".to_string(),
        };
        match rx.recv_timeout(deadline) {
            Ok(result) => result,
            Err(RecvTimeoutError::Disconnected) => Err(panicked()),
            Err(RecvTimeoutError::Timeout) => {
                // Counted before the thread can see `ABANDONED`, so its
                // decrement never runs ahead of this increment.
                self.hung.fetch_add(1, SeqCst);
                if state
                    .compare_exchange(RUNNING, ABANDONED, SeqCst, SeqCst)
                    .is_ok()
                {
                    Err(temporary(
                        key,
                        format!(
                            "no answer from {} within {:.1} s",
                            self.inner.location(),
                            deadline.as_secs_f64()
                        ),
                    ))
                } else {
                    // The answer arrived in the instant between the two.
                    self.hung.fetch_sub(1, SeqCst);
                    rx.recv().unwrap_or_else(|_| Err(panicked()))
                }
            }
        }
    }
}

impl Backend for Timeout {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        // The thread may outlive this call, so it must own a copy of lent
        // bytes; callers that can share them use `put_shared`.
        self.put_shared(key, bytes::Bytes::copy_from_slice(data), None)
    }
    /// The request thread holds a reference to the shared bytes: no copy.
    fn put_shared(
        &self,
        key: &str,
        data: bytes::Bytes,
        retention: Option<&super::Retention>,
    ) -> Result<PutOutcome, BackendError> {
        let (k, r) = (key.to_string(), retention.copied());
        let deadline = self.deadline(data.len() as u64);
        self.run(key, deadline, move |b| b.put_shared(&k, data, r.as_ref()))
    }
    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        let size = range.as_ref().map_or(0, |r| r.end.saturating_sub(r.start));
        let k = key.to_string();
        self.run(key, self.deadline(size), move |b| b.get(&k, range))
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let p = prefix.to_string();
        let deadline = self.per_request.saturating_mul(LIST_DEADLINE_FACTOR);
        self.run(prefix, deadline, move |b| b.list(&p))
    }
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let k = key.to_string();
        self.run(key, self.deadline(0), move |b| b.delete(&k))
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        let k = key.to_string();
        self.run(key, self.deadline(0), move |b| b.stat(&k))
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
    /// Under the same deadline as a request (a hint on a hung mount must
    /// not hang its caller); its outcome is of no interest.
    fn prefetch(&self, key: &str) {
        let k = key.to_string();
        let _ = self.run(key, self.deadline(0), move |b| {
            b.prefetch(&k);
            Ok(())
        });
    }
    fn exclusive_create(&self) -> bool {
        self.inner.exclusive_create()
    }
    fn remove_stale_temp_files(
        &self,
        older_than: Duration,
        now: std::time::SystemTime,
    ) -> Result<usize, BackendError> {
        // A maintenance sweep may scan a whole store; no per-request deadline fits it.
        self.inner.remove_stale_temp_files(older_than, now)
    }
    fn object_lock(&self) -> bool {
        self.inner.object_lock()
    }
    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        retention: &super::Retention,
    ) -> Result<PutOutcome, BackendError> {
        self.put_shared(key, bytes::Bytes::copy_from_slice(data), Some(retention))
    }
    fn extend_retention(
        &self,
        key: &str,
        retention: &super::Retention,
    ) -> Result<(), BackendError> {
        let (k, r) = (key.to_string(), *retention);
        self.run(key, self.deadline(0), move |b| b.extend_retention(&k, &r))
    }
    fn retained_until(&self, key: &str) -> Result<super::Retained, BackendError> {
        let k = key.to_string();
        self.run(key, self.deadline(0), move |b| b.retained_until(&k))
    }
    fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let (k, d) = (key.to_string(), data.to_vec());
        self.run(key, self.deadline(data.len() as u64), move |b| {
            b.put_replacing(&k, &d)
        })
    }
}

// ------------------------------------------------------ fault injection ---

/// What [`Faulty`] injects; the default injects nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultPolicy {
    /// Probability that a call fails before reaching the store.
    pub error_rate: f64,
    /// Probability that a call reaches the store, takes effect, and then
    /// fails anyway: a reply lost on the way back.
    pub error_after_rate: f64,
    /// Mean added latency; each call sleeps uniformly in `[0, 2 × latency]`.
    pub latency: Duration,
    /// Probability that a successful `get` returns a shorter prefix.
    pub truncate_rate: f64,
    /// Seed of the random draws, so a failing test can be replayed.
    pub seed: u64,
}

/// A [`Backend`] wrapper that injects the faults of a flaky network, for
/// testing the layers above it.
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Backend>,
    policy: FaultPolicy,
    rng: Mutex<StdRng>,
    down: AtomicBool,
    calls: AtomicU64,
    injected: AtomicU64,
}

impl Faulty {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>, policy: FaultPolicy) -> Self {
        Self {
            inner,
            rng: Mutex::new(StdRng::seed_from_u64(policy.seed)),
            policy,
            down: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Takes the whole store down (every call refused) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, SeqCst);
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(SeqCst)
    }

    /// How many calls reached this wrapper, faulted or not.
    pub fn calls(&self) -> u64 {
        self.calls.load(SeqCst)
    }

    fn rng(&self) -> MutexGuard<'_, StdRng> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inject(&self, key: &str, message: &str) -> BackendError {
        self.injected.fetch_add(1, SeqCst);
        temporary(key, message.to_string())
    }

    fn call<T>(
        &self,
        key: &str,
        op: impl FnOnce(&dyn Backend) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.calls.fetch_add(1, SeqCst);
        // Every draw is made up front under one lock, so a single-threaded
        // test sees the same faults on every run.
        let (latency, before, after) = {
            let mut rng = self.rng();
            let latency = if self.policy.latency.is_zero() {
                Duration::ZERO
            } else {
                let max = self.policy.latency.saturating_mul(2).as_nanos();
                Duration::from_nanos(rng.gen_range(0..=u64::try_from(max).unwrap_or(u64::MAX)))
            };
            let before = rng.gen::<f64>() < self.policy.error_rate;
            let after = rng.gen::<f64>() < self.policy.error_after_rate;
            (latency, before, after)
        };
        if !latency.is_zero() {
            thread::sleep(latency);
        }
        if self.down.load(SeqCst) {
            return Err(self.inject(key, "connection refused (injected: store down)"));
        }
        if before {
            return Err(self.inject(key, "connection reset (injected)"));
        }
        let result = op(&*self.inner);
        if after {
            return Err(self.inject(
                key,
                "connection reset after the request was sent (injected)",
            ));
        }
        result
    }
}

impl Backend for Faulty {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        self.call(key, |b| b.put(key, data))
    }
    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        let mut bytes = self.call(key, |b| b.get(key, range))?;
        // A transport that silently cut the body short; the layers above must
        // catch it by authenticating what they read.
        if !bytes.is_empty() && self.policy.truncate_rate > 0.0 {
            let mut rng = self.rng();
            if rng.gen::<f64>() < self.policy.truncate_rate {
                let keep = rng.gen_range(0..bytes.len());
                drop(rng);
                bytes.truncate(keep);
                self.injected.fetch_add(1, SeqCst);
            }
        }
        Ok(bytes)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.call(prefix, |b| b.list(prefix))
    }
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.call(key, |b| b.delete(key))
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        self.call(key, |b| b.stat(key))
    }
    fn location(&self) -> String {
        format!("faulty({})", self.inner.location())
    }
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
    fn prefetch(&self, key: &str) {
        self.inner.prefetch(key)
    }
    fn exclusive_create(&self) -> bool {
        self.inner.exclusive_create()
    }
    fn remove_stale_temp_files(
        &self,
        older_than: Duration,
        now: std::time::SystemTime,
    ) -> Result<usize, BackendError> {
        self.inner.remove_stale_temp_files(older_than, now)
    }
}

// ------------------------------------------------------------ the stack ---

/// Settings for the whole stack built by [`resilient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResiliencePolicy {
    /// How temporary failures are retried.
    pub retry: RetryPolicy,
    /// When the circuit breaker opens.
    pub breaker: BreakerPolicy,
    /// Most calls in flight into the store at once.
    pub max_in_flight: usize,
    /// The base deadline of every request; `None` leaves deadlines to a
    /// backend that enforces its own (S3 cancels its requests, which beats
    /// abandoning a thread).
    pub timeout: Option<Duration>,
    /// Bytes per second a transfer may not fall below; larger requests get
    /// proportionally longer deadlines.
    pub min_throughput: u64,
}

impl Default for ResiliencePolicy {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            max_in_flight: 8,
            timeout: Some(Duration::from_secs(30)),
            min_throughput: 1 << 20,
        }
    }
}

/// A store wrapped by [`resilient`], with a handle on its circuit breaker.
#[derive(Debug, Clone)]
pub struct Resilient {
    /// The wrapped store; use it wherever a backend is wanted.
    pub backend: Arc<dyn Backend>,
    /// Observes the breaker, e.g. to report an outage.
    pub breaker: BreakerHandle,
}

/// Wraps `inner` as Retry → CircuitBreaker → Limiter → Timeout → `inner`;
/// the module doc explains the order.
pub fn resilient(inner: Arc<dyn Backend>, policy: &ResiliencePolicy) -> Resilient {
    let timed: Arc<dyn Backend> = match policy.timeout {
        Some(t) => Arc::new(Timeout::new(inner, t, policy.min_throughput)),
        None => inner,
    };
    let limited = Arc::new(Limiter::new(timed, policy.max_in_flight));
    let breaker = CircuitBreaker::new(limited, policy.breaker);
    let handle = breaker.handle();
    Resilient {
        backend: Arc::new(Retry::new(Arc::new(breaker), policy.retry)),
        breaker: handle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{conformance, MemoryBackend};

    fn memory() -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new())
    }

    fn fast_retry(max_attempts: u32, max_elapsed: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
            max_elapsed,
        }
    }

    /// A store whose every call takes `delay` and which records the most
    /// calls it ever had in flight at once.
    #[derive(Debug, Default)]
    struct Slow {
        mem: MemoryBackend,
        delay: Duration,
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl Slow {
        fn new(delay: Duration) -> Self {
            Self {
                delay,
                ..Self::default()
            }
        }

        fn call<T>(&self, op: impl FnOnce(&MemoryBackend) -> T) -> T {
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(n, SeqCst);
            thread::sleep(self.delay);
            let result = op(&self.mem);
            self.now.fetch_sub(1, SeqCst);
            result
        }
    }

    impl Backend for Slow {
        fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
            self.call(|m| m.put(key, data))
        }
        fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
            self.call(|m| m.get(key, range))
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
            self.call(|m| m.list(prefix))
        }
        fn delete(&self, key: &str) -> Result<(), BackendError> {
            self.call(|m| m.delete(key))
        }
        fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
            self.call(|m| m.stat(key))
        }
        fn location(&self) -> String {
            "slow".to_string()
        }
    }

    #[test]
    fn retry_recovers_from_transient_errors_and_the_data_is_intact() {
        let policy = FaultPolicy {
            error_rate: 0.3,
            error_after_rate: 0.2,
            seed: 7,
            ..FaultPolicy::default()
        };
        let faulty = Arc::new(Faulty::new(memory(), policy));
        let store = Retry::new(faulty.clone(), fast_retry(60, Duration::from_secs(10)));
        let payload = |i: u32| {
            format!("object number {i}")
                .repeat(1 + i as usize % 5)
                .into_bytes()
        };
        for i in 0..200 {
            // AlreadyExists is a success too: it means a "failed" attempt landed.
            store.put(&format!("data/{i}"), &payload(i)).unwrap();
        }
        for i in 0..200 {
            assert_eq!(store.get(&format!("data/{i}"), None).unwrap(), payload(i));
        }
        assert!(
            faulty.injected() > 50,
            "faults were injected: {}",
            faulty.injected()
        );
    }

    #[test]
    fn retry_gives_up_within_its_time_budget_when_the_store_is_down() {
        let faulty = Arc::new(Faulty::new(memory(), FaultPolicy::default()));
        faulty.set_down(true);
        let policy = RetryPolicy {
            max_attempts: 1000,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_elapsed: Duration::from_millis(200),
        };
        let start = Instant::now();
        let err = Retry::new(faulty.clone(), policy)
            .put("a", b"x")
            .unwrap_err();
        assert!(err.is_temporary(), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert!(err.to_string().contains("gave up after"), "{err}");
        assert!(faulty.calls() > 1, "it did retry");
    }

    #[test]
    fn permanent_and_not_found_errors_are_not_retried() {
        let faulty = Arc::new(Faulty::new(memory(), FaultPolicy::default()));
        let store = Retry::new(faulty.clone(), fast_retry(10, Duration::from_secs(1)));
        assert!(store.get("missing", None).unwrap_err().is_not_found());
        assert_eq!(faulty.calls(), 1);
        let err = store.put("UPPER", b"x").unwrap_err();
        assert!(matches!(err, BackendError::Permanent { .. }), "{err}");
        assert_eq!(faulty.calls(), 2);
    }

    #[test]
    fn breaker_opens_after_repeated_failures_fails_fast_then_probes_and_closes() {
        let faulty = Arc::new(Faulty::new(memory(), FaultPolicy::default()));
        let policy = BreakerPolicy {
            failure_threshold: 3,
            cool_down: Duration::from_millis(30),
            max_cool_down: Duration::from_secs(1),
        };
        let breaker = CircuitBreaker::new(faulty.clone(), policy);
        let handle = breaker.handle();
        faulty.set_down(true);
        for _ in 0..3 {
            assert!(breaker.put("k", b"x").unwrap_err().is_temporary());
        }
        assert_eq!(handle.state(), BreakerState::Open);
        assert_eq!(handle.times_opened(), 1);
        let err = breaker.put("k", b"x").unwrap_err();
        assert!(
            err.is_temporary() && err.to_string().contains("circuit breaker open"),
            "{err}"
        );
        assert_eq!(faulty.calls(), 3, "an open breaker does not call the store");

        // The first probe fails: the breaker re-opens with a doubled cool-down.
        thread::sleep(Duration::from_millis(40));
        assert!(breaker
            .put("k", b"x")
            .unwrap_err()
            .to_string()
            .contains("refused"));
        assert_eq!(
            (faulty.calls(), breaker.state(), breaker.times_opened()),
            (4, BreakerState::Open, 2)
        );
        assert!(breaker
            .put("k", b"x")
            .unwrap_err()
            .to_string()
            .contains("circuit breaker"));
        assert_eq!(faulty.calls(), 4);

        // The store is back; after the doubled cool-down the probe closes it.
        faulty.set_down(false);
        thread::sleep(Duration::from_millis(80));
        assert_eq!(breaker.put("k", b"x").unwrap(), PutOutcome::Created);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(faulty.calls(), 5);
    }

    #[test]
    fn a_half_open_breaker_lets_exactly_one_probe_through() {
        let slow = Arc::new(Slow::new(Duration::from_millis(300)));
        let faulty = Arc::new(Faulty::new(slow, FaultPolicy::default()));
        let policy = BreakerPolicy {
            failure_threshold: 1,
            cool_down: Duration::from_millis(10),
            max_cool_down: Duration::from_secs(1),
        };
        let breaker = CircuitBreaker::new(faulty.clone(), policy);
        faulty.set_down(true);
        assert!(breaker.put("k", b"x").is_err());
        faulty.set_down(false);
        thread::sleep(Duration::from_millis(20));
        thread::scope(|s| {
            let probe = s.spawn(|| breaker.put("k", b"x"));
            for _ in 0..1000 {
                if breaker.state() == BreakerState::HalfOpen {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(breaker.state(), BreakerState::HalfOpen);
            let err = breaker.get("k", None).unwrap_err();
            assert!(
                err.is_temporary() && err.to_string().contains("probe is in flight"),
                "{err}"
            );
            assert_eq!(probe.join().unwrap().unwrap(), PutOutcome::Created);
        });
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(
            faulty.calls(),
            2,
            "the failure and the probe; nothing else reached the store"
        );
    }

    #[test]
    fn limiter_never_exceeds_its_bound() {
        let slow = Arc::new(Slow::new(Duration::from_millis(10)));
        let limiter = Limiter::new(slow.clone(), 3);
        thread::scope(|s| {
            for t in 0..8 {
                let limiter = &limiter;
                s.spawn(move || {
                    for i in 0..4 {
                        limiter.put(&format!("t{t}/{i}"), b"x").unwrap();
                    }
                });
            }
        });
        assert!(
            slow.max.load(SeqCst) <= 3,
            "max in flight {}",
            slow.max.load(SeqCst)
        );
        assert_eq!(slow.mem.list("").unwrap().len(), 32);
        assert_eq!(
            limiter.concurrency(),
            2,
            "reports the store's preference (2 by default) within its bound"
        );
    }

    #[test]
    fn timeout_cuts_a_hung_request() {
        // A fixed delay rather than Faulty's jittered one, which may draw
        // less than the deadline.
        let slow = Arc::new(Slow::new(Duration::from_millis(500)));
        let store = Timeout::new(slow, Duration::from_millis(50), 1 << 30);
        let start = Instant::now();
        let err = store.put("k", b"x").unwrap_err();
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert!(
            err.is_temporary() && err.to_string().contains("no answer from slow"),
            "{err}"
        );
        assert_eq!(store.hung.load(SeqCst), 1);
    }

    #[test]
    fn resilient_stack_passes_the_conformance_suite() {
        let stack = resilient(memory(), &ResiliencePolicy::default());
        conformance::run_all(&*stack.backend);
        assert_eq!(stack.breaker.state(), BreakerState::Closed);
        assert_eq!(stack.breaker.times_opened(), 0);
    }

    /// A memory store that records where the bytes of each shared put
    /// live, so a test can tell whether a layer above copied them.
    #[derive(Debug, Default)]
    struct SeesBytes {
        mem: MemoryBackend,
        seen: Mutex<Vec<usize>>,
    }

    impl Backend for SeesBytes {
        fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
            self.mem.put(key, data)
        }
        fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
            self.mem.get(key, range)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
            self.mem.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), BackendError> {
            self.mem.delete(key)
        }
        fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
            self.mem.stat(key)
        }
        fn location(&self) -> String {
            "sees-bytes".into()
        }
        fn object_lock(&self) -> bool {
            true
        }
        fn put_shared(
            &self,
            key: &str,
            data: bytes::Bytes,
            retention: Option<&super::super::Retention>,
        ) -> Result<PutOutcome, BackendError> {
            self.seen.lock().unwrap().push(data.as_ptr() as usize);
            match retention {
                Some(r) => self.mem.put_retained(key, &data, r),
                None => self.mem.put(key, &data),
            }
        }
    }

    #[test]
    fn a_shared_put_reaches_the_store_through_every_layer_without_a_copy() {
        let inner = Arc::new(SeesBytes {
            mem: MemoryBackend::with_object_lock(),
            seen: Mutex::default(),
        });
        let stack = resilient(inner.clone(), &ResiliencePolicy::default());
        // 8 MiB, a pack: the timeout layer used to copy it for its thread.
        let data = bytes::Bytes::from(vec![7u8; 8 << 20]);
        let retention = super::super::Retention {
            mode: super::super::LockMode::Governance,
            until: chrono::Utc::now() + chrono::Duration::days(1),
        };
        let b = &stack.backend;
        assert_eq!(
            b.put_shared("data/ab/plain", data.clone(), None).unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            b.put_shared("data/ab/locked", data.clone(), Some(&retention))
                .unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            *inner.seen.lock().unwrap(),
            [data.as_ptr() as usize; 2],
            "the store got the caller's bytes, not a copy"
        );
        assert_eq!(b.get("data/ab/locked", None).unwrap(), data.to_vec());
        assert!(
            b.delete("data/ab/locked").is_err(),
            "the retention went through with the bytes"
        );
    }

    #[test]
    fn faulty_without_faults_passes_the_conformance_suite() {
        let faulty = Faulty::new(memory(), FaultPolicy::default());
        conformance::run_all(&faulty);
        assert_eq!(faulty.injected(), 0);
        assert_eq!(faulty.location(), "faulty(memory)");
    }

    #[test]
    fn faulty_truncation_returns_a_shorter_prefix() {
        let policy = FaultPolicy {
            truncate_rate: 1.0,
            seed: 3,
            ..FaultPolicy::default()
        };
        let faulty = Faulty::new(memory(), policy);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        faulty.put("k", &data).unwrap();
        for _ in 0..20 {
            let got = faulty.get("k", None).unwrap();
            assert!(
                got.len() < data.len() && data.starts_with(&got),
                "{} bytes",
                got.len()
            );
        }
        assert_eq!(faulty.injected(), 20);
    }
}
