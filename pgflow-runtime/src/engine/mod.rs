//! The engine of a runtime: the state its loops share ([`Engine`]) and the loops
//! themselves, one file each.
//!
//! - [`claimer`]: one per queue; claims tasks while there are free slots and spawns
//!   their executions ([`executor`]).
//! - [`flusher`]: applies completions in batches (`store::flush`).
//! - [`listener`]: turns `NOTIFY pgflow_tasks` into wake-ups.
//! - [`rescuer`]: gives lost claims back to the queue.
//! - [`heartbeat`]: keeps this instance's row alive with its load.
//! - [`maintenance`]: vacuums the hot tables.
//! - [`promoter`]: moves parked tasks (due later) back into the claim's index
//!   shortly before they are due.
//! - [`pruner`]: prunes finished runs past their retention (when configured).
//! - [`scheduler`]: fires the cron schedules this instance registers.
//!
//! Arrows point one way: the API (`Runtime`, the builder) starts and stops the
//! engine; the engine calls the store; the store knows neither.

pub(crate) mod claimer;
pub(crate) mod executor;
pub(crate) mod flusher;
pub(crate) mod heartbeat;
pub(crate) mod listener;
pub(crate) mod maintenance;
pub(crate) mod promoter;
pub(crate) mod pruner;
pub(crate) mod rescuer;
pub(crate) mod scheduler;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgflow::{CancelToken, Data};
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::store::flush::{Completion, Outcome};

/// What the flusher receives.
#[derive(Debug)]
pub(crate) enum FlushMsg {
    /// A completion to apply, with its place among the completions not yet durable
    /// (see [`Engine::unflushed`]), given back once it is.
    Completion(Completion, Option<OwnedSemaphorePermit>),
    /// Answered once everything sent before it is applied.
    Barrier(oneshot::Sender<()>),
}

/// A claim being executed here, keyed by (task id, claim token).
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    pub(crate) element: Option<i32>,
    pub(crate) workflow: &'static str,
    pub(crate) version: i32,
}

/// Counters the loops keep (read by `Runtime::stats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claims: AtomicU64,
    pub(crate) tasks_claimed: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) runs_finished: AtomicU64,
}

/// The running loops, stopped at shutdown.
#[derive(Debug)]
pub(crate) struct Loops {
    /// The claimers: they stop claiming and return once their executions are done.
    claimers: Vec<JoinHandle<()>>,
    /// Everything else: aborted last.
    others: Vec<JoinHandle<()>>,
}

/// The wake-ups of one queue's claimers: tasks may be due.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    /// The claimer's.
    pub(crate) claim: Notify,
    /// A fair queue's express claim (see `claimer::express`).
    pub(crate) express: Notify,
}

impl Wakers {
    fn wake(&self) {
        self.claim.notify_one();
        self.express.notify_one();
    }
}

/// The state shared by a runtime's loops and its API.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) pool: PgPool,
    pub(crate) instance_id: String,
    pub(crate) catalog: Catalog,
    pub(crate) data: Arc<Data>,
    pub(crate) config: Config,
    /// Served queues and their concurrency.
    pub(crate) queues: Vec<(String, usize)>,
    wakers: HashMap<String, Arc<Wakers>>,
    pub(crate) completions: mpsc::UnboundedSender<FlushMsg>,
    shutdown: watch::Sender<bool>,
    /// Callers of `RunHandle::wait`, woken when their run finishes here; each entry
    /// is removed by its [`Waiter`] when the wait ends, however it ends.
    waiters: Mutex<foldhash::HashMap<i64, Vec<WaiterSlot>>>,
    next_waiter: AtomicU64,
    /// The cancel token of each run with steps executing here, and how many.
    cancels: Mutex<foldhash::HashMap<i64, (CancelToken, usize)>>,
    /// Claims being executed (their count is the load reported in heartbeats).
    pub(crate) in_flight: Mutex<foldhash::HashMap<(i64, i64), InFlight>>,
    /// What the metrics endpoint reports (nothing without the `metrics` feature).
    pub(crate) metrics: crate::metrics::Metrics,
    loops: Mutex<Option<Loops>>,
    pub(crate) counters: Counters,
    /// Places for completions that are not durable yet, twice the runtime's total
    /// concurrency. An execution takes one before it hands its completion to the
    /// flusher (and only then frees its slot); the flusher frees it once the
    /// completion is committed. So a stalled flusher stops the claimers after at most
    /// three times the concurrency of executed, un-flushed steps, while a working one
    /// overlaps a flush with the next batches of executions (one place per slot made
    /// flushes smaller and more frequent: chain3 lost ~7 % in the bench).
    pub(crate) unflushed: Arc<tokio::sync::Semaphore>,
    /// Connections transactional steps may hold at once: the pool's size less three
    /// (the flusher, the heartbeat, the rest of the engine), so steps holding their
    /// transactions can never starve the loops that keep the instance alive.
    pub(crate) transactional: Arc<tokio::sync::Semaphore>,
    /// When each workflow version started here was last checked for a live instance
    /// that serves it.
    pub(crate) served_checks: Mutex<Every<(&'static str, u32)>>,
}

impl Engine {
    /// The engine's state; nothing runs until [`Engine::start_loops`].
    pub(crate) fn new(
        pool: PgPool,
        instance_id: String,
        catalog: Catalog,
        data: Data,
        config: Config,
        queues: Vec<(String, usize)>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<FlushMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (shutdown, _) = watch::channel(false);
        let places = queues.iter().map(|(_, c)| *c).sum::<usize>().max(1) * 2;
        let transactional = usize::try_from(pool.options().get_max_connections())
            .unwrap_or(usize::MAX)
            .saturating_sub(3)
            .max(1);
        let wakers = queues
            .iter()
            .map(|(q, _)| (q.clone(), Arc::new(Wakers::default())))
            .collect();
        let engine = Arc::new(Self {
            pool,
            instance_id,
            catalog,
            data: Arc::new(data),
            config,
            queues,
            wakers,
            completions: tx,
            shutdown,
            waiters: Mutex::default(),
            next_waiter: AtomicU64::new(0),
            cancels: Mutex::default(),
            in_flight: Mutex::default(),
            metrics: crate::metrics::Metrics::default(),
            loops: Mutex::new(None),
            counters: Counters::default(),
            unflushed: Arc::new(tokio::sync::Semaphore::new(places)),
            transactional: Arc::new(tokio::sync::Semaphore::new(transactional)),
            served_checks: Mutex::new(Every::default()),
        });
        (engine, rx)
    }

    /// Spawns the loops: the flusher and heartbeat always; the scheduler with
    /// schedules to fire; with queues to serve, the listener, rescuer, maintainer,
    /// promoter and one claimer per queue.
    pub(crate) fn start_loops(
        self: &Arc<Self>,
        completions: mpsc::UnboundedReceiver<FlushMsg>,
        schedules: Arc<[crate::Schedule]>,
    ) {
        let mut others = vec![
            tokio::spawn(flusher::run(Arc::clone(self), completions)),
            tokio::spawn(heartbeat::run(Arc::clone(self))),
        ];
        if !schedules.is_empty() {
            others.push(tokio::spawn(scheduler::run(Arc::clone(self), schedules)));
        }
        if let Some(retention) = self.config.retention {
            others.push(tokio::spawn(pruner::run(Arc::clone(self), retention)));
        }
        let mut claimers = Vec::new();
        if !self.queues.is_empty() {
            others.push(tokio::spawn(listener::run(Arc::clone(self))));
            others.push(tokio::spawn(rescuer::run(Arc::clone(self))));
            others.push(tokio::spawn(maintenance::run(Arc::clone(self))));
            others.push(tokio::spawn(promoter::run(Arc::clone(self))));
            for (q, c) in &self.queues {
                claimers.push(tokio::spawn(claimer::run(Arc::clone(self), q.clone(), *c)));
            }
        }
        if let Ok(mut l) = self.loops.lock() {
            *l = Some(Loops { claimers, others });
        }
    }

    /// Stops the loops: claimers stop claiming and wait for their executions (up to
    /// the shutdown grace); what still runs past it is given back (attempt not
    /// counted); everything sent to the flusher is applied; the other loops stop.
    /// Returns false when the loops were already stopped.
    pub(crate) async fn stop_loops(&self) -> bool {
        // `send_replace` stores the value even when no loop has subscribed yet (a
        // shutdown right after start): a loop that subscribes later sees it.
        self.shutdown.send_replace(true);
        let Some(loops) = self.loops.lock().ok().and_then(|mut l| l.take()) else {
            return false;
        };
        for c in loops.claimers {
            let _ = c.await;
        }
        let left: Vec<((i64, i64), InFlight)> = self
            .in_flight
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default();
        for ((task_id, token), f) in left {
            // Attempt 0: a release does not count the attempt (see `store::flush`).
            let _ = self.completions.send(FlushMsg::Completion(
                Completion {
                    task_id,
                    token,
                    run_id: f.run_id,
                    step: f.step,
                    element: f.element,
                    workflow: f.workflow,
                    version: f.version,
                    attempt: 0,
                    outcome: Outcome::Release,
                    cost_cents: 0,
                    usage: Vec::new(),
                },
                None,
            ));
        }
        let (ack, flushed) = oneshot::channel();
        if self.completions.send(FlushMsg::Barrier(ack)).is_ok() {
            let _ = tokio::time::timeout(self.config.shutdown_grace, flushed).await;
        }
        for h in loops.others {
            h.abort();
            let _ = h.await;
        }
        release_live(&live_key(&self.pool, &self.instance_id));
        true
    }

    pub(crate) fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn waker(&self, queue: &str) -> Arc<Wakers> {
        self.wakers.get(queue).cloned().unwrap_or_default()
    }

    pub(crate) fn wake_queue(&self, queue: &str) {
        if let Some(w) = self.wakers.get(queue) {
            w.wake();
        }
    }

    pub(crate) fn wake_all(&self) {
        for w in self.wakers.values() {
            w.wake();
        }
    }

    /// Wakes the `wait()`ers of these runs.
    pub(crate) fn wake_waiters(&self, runs: &[i64]) {
        if runs.is_empty() {
            return;
        }
        if let Ok(mut w) = self.waiters.lock() {
            for id in runs {
                for (_, tx) in w.remove(id).into_iter().flatten() {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// A waiter woken when run `run` finishes here; dropping it unregisters it.
    pub(crate) fn register_waiter(self: &Arc<Self>, run: i64) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let key = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(run).or_default().push((key, tx));
        }
        Waiter {
            engine: Arc::clone(self),
            run,
            key,
            rx,
        }
    }

    /// How many waits are registered (for the runtime's own tests).
    pub(crate) fn waiter_count(&self) -> usize {
        self.waiters
            .lock()
            .map(|w| w.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    /// Whether the loops run (not stopped yet).
    pub(crate) fn is_running(&self) -> bool {
        self.loops.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// The cancel token shared by this run's steps executing here; give it back
    /// with [`release_cancel_token`](Self::release_cancel_token).
    pub(crate) fn cancel_token(&self, run: i64) -> CancelToken {
        let Ok(mut c) = self.cancels.lock() else {
            return CancelToken::new();
        };
        let e = c.entry(run).or_insert_with(|| (CancelToken::new(), 0));
        e.1 += 1;
        e.0.clone()
    }

    pub(crate) fn release_cancel_token(&self, run: i64) {
        if let Ok(mut c) = self.cancels.lock() {
            if let Some(e) = c.get_mut(&run) {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    c.remove(&run);
                }
            }
        }
    }

    /// Cancels the steps of `run` executing here.
    pub(crate) fn cancel_local(&self, run: i64) {
        if let Ok(c) = self.cancels.lock() {
            if let Some((t, _)) = c.get(&run) {
                t.cancel();
            }
        }
    }

    pub(crate) fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The instance ids the runtimes of this process hold, per database (from start to
/// the end of their shutdown). Two runtimes of one process cannot hold one id; and a
/// row holding an id with this host and pid that no runtime here holds belongs to a
/// previous incarnation of this process (a container whose process is PID 1 every
/// time), which is gone.
fn live_ids() -> &'static Mutex<std::collections::HashSet<String>> {
    static LIVE: std::sync::OnceLock<Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// The key of instance id `id` in the database `pool` connects to.
pub(crate) fn live_key(pool: &PgPool, id: &str) -> String {
    let o = pool.connect_options();
    format!(
        "{}:{}/{}#{id}",
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or_default()
    )
}

/// Takes `key` for a runtime of this process; false when another one holds it.
pub(crate) fn hold_live(key: &str) -> bool {
    live_ids()
        .lock()
        .map(|mut l| l.insert(key.to_owned()))
        .unwrap_or(true)
}

/// Gives `key` back.
pub(crate) fn release_live(key: &str) {
    if let Ok(mut l) = live_ids().lock() {
        l.remove(key);
    }
}

/// One registered wait: its key and what wakes it.
type WaiterSlot = (u64, oneshot::Sender<()>);

/// A registered wait for a run (see [`Engine::register_waiter`]).
pub(crate) struct Waiter {
    engine: Arc<Engine>,
    run: i64,
    key: u64,
    /// Fires when the run finishes here.
    pub(crate) rx: oneshot::Receiver<()>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut w) = self.engine.waiters.lock() {
            if let Some(list) = w.get_mut(&self.run) {
                list.retain(|(k, _)| *k != self.key);
                if list.is_empty() {
                    w.remove(&self.run);
                }
            }
        }
    }
}

/// "At most once per interval, per key": when each key last passed.
#[derive(Debug)]
pub(crate) struct Every<K>(HashMap<K, std::time::Instant>);

impl<K> Default for Every<K> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq> Every<K> {
    /// Whether `key` may pass now (its last pass is at least `interval` ago); if so,
    /// now is its last pass.
    pub(crate) fn due(&mut self, key: K, interval: Duration) -> bool {
        let now = std::time::Instant::now();
        let due = self
            .0
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= interval);
        if due {
            self.0.insert(key, now);
        }
        due
    }
}

/// Backoff after a database error in a loop: 50 ms doubling to 5 s.
pub(crate) struct Backoff(u32);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(0)
    }
    pub(crate) fn reset(&mut self) {
        self.0 = 0;
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = Duration::from_millis(50u64.saturating_mul(1 << self.0.min(7)))
            .min(Duration::from_secs(5));
        self.0 = self.0.saturating_add(1);
        d
    }
}

/// Sleeps `d`, or less if shutdown begins.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}
