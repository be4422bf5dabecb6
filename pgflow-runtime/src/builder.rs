//! [`RuntimeBuilder`]: configures a runtime, and starts it — connect, migrate,
//! register the linked workflows' definitions and this instance, give back what a
//! dead predecessor under the same id still held, and start the engine's loops.

use std::collections::BTreeMap;
use std::time::Duration;

use pgflow::{Data, WorkflowDef};
use serde_json::Value;
use sqlx::PgPool;
use tracing::warn;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::engine::Engine;
use crate::engine::rescuer::rescue_once;
use crate::store::instances::{self, Registered, Registration};
use crate::store::{definitions, version_i32};
use crate::{Error, Runtime, Schedule};

/// Configures and starts a [`Runtime`].
///
/// ```no_run
/// # async fn demo() -> Result<(), pgflow_runtime::Error> {
/// let rt = pgflow_runtime::Runtime::builder()
///     .database_url("postgres://postgres@127.0.0.1:5432/postgres")
///     .queue("default", 16)
///     .queue("llm", 4)
///     .instance_id("instance_a")
///     .data(String::from("shared state, read with ctx.data::<String>()"))
///     .start()
///     .await?;
/// rt.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct RuntimeBuilder {
    url: Option<String>,
    pool: Option<PgPool>,
    queues: Vec<(String, usize)>,
    instance_id: Option<String>,
    data: Data,
    config: Config,
    schedules: Vec<Schedule>,
}

impl RuntimeBuilder {
    /// Connects to this URL (the password is never logged or shown in errors).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Uses this pool instead of connecting.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Serves `queue` with up to `concurrency` steps at once. A runtime with no
    /// queue only starts and reads runs (a producer).
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        self.queues.push((queue.into(), concurrency));
        self
    }

    /// Serves `queue` like [`queue`](Self::queue), claiming **fairly across run keys**
    /// (`#[workflow(key = ..)]`, `StartOptions::key`): each claim serves the keys
    /// with due tasks in turn (round robin, equal shares of the batch), so one
    /// tenant's backlog of 100,000 runs does not delay another tenant's trickle.
    /// Tasks without a key are served in arrival order as one more share. Costs an
    /// index probe per key served; an ordinary queue claims in priority and arrival
    /// order only.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), pgflow_runtime::Error> {
    /// let rt = pgflow_runtime::Runtime::builder()
    ///     .fair_queue("llm", 32)
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn fair_queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        let queue = queue.into();
        self.config.fair_queues.push(queue.clone());
        self.queues.push((queue, concurrency));
        self
    }

    /// Runs at most `limit` tasks of one run key at once in `queue` (a queue this
    /// runtime serves), across every instance that serves it with the same limit:
    /// e.g. at most 2 LLM calls per tenant. A task over the limit stays queued,
    /// holding no slot, until one of its key's tasks ends. Implies fair claiming
    /// (see [`fair_queue`](Self::fair_queue)); tasks without a key are not limited.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), pgflow_runtime::Error> {
    /// let rt = pgflow_runtime::Runtime::builder()
    ///     .queue("llm", 32)
    ///     .key_concurrency("llm", 2)
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn key_concurrency(mut self, queue: impl Into<String>, limit: u32) -> Self {
        self.config.key_limits.push((queue.into(), limit));
        self
    }

    /// Defines a rate limit or a budget per period that steps count against with
    /// `#[step(limits = ["name"])]`, across every instance that defines it the same
    /// way (see [`Limit`](crate::Limit)). A step of a served workflow that names a
    /// limit no runtime defines is refused at start.
    pub fn limit(mut self, limit: crate::Limit) -> Self {
        self.config.limits.push(limit);
        self
    }

    /// This instance's id (default: `$INSTANCE_ID`, else `host-pid`).
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Shared state that steps read with `ctx.data::<T>()`.
    pub fn data<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.data.insert(value);
        self
    }

    /// How often idle workers poll for due tasks (default 250 ms); notifications
    /// wake them sooner.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }

    /// The most tasks one claim takes (default 500).
    pub fn claim_batch(mut self, n: usize) -> Self {
        self.config.claim_batch = n.max(1);
        self
    }

    /// The most completions one flush applies (default 2,000).
    pub fn flush_batch(mut self, n: usize) -> Self {
        self.config.flush_batch = n.max(1);
        self
    }

    /// The most bytes of step outputs one flush carries (default 32 MiB); a larger
    /// output is flushed on its own.
    pub fn flush_batch_bytes(mut self, n: usize) -> Self {
        self.config.flush_batch_bytes = n.max(1);
        self
    }

    /// The largest output a step may return, as JSON (default 255 MiB, about the
    /// most a PostgreSQL `jsonb` holds); a step returning more fails permanently
    /// with a message saying so.
    pub fn max_output_bytes(mut self, n: usize) -> Self {
        self.config.max_output_bytes = n.max(1);
        self
    }

    /// Added to each step's timeout to get its lease (default 30 s).
    pub fn lease_grace(mut self, d: Duration) -> Self {
        self.config.lease_grace = d;
        self
    }

    /// How often this instance heartbeats into `pgflow.instances` (default 5 s).
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.config.heartbeat_interval = d;
        self
    }

    /// An instance whose last heartbeat is older than this is marked offline and its
    /// claimed tasks return to the queue (default 30 s). Keep it several heartbeat
    /// intervals long.
    pub fn offline_after(mut self, d: Duration) -> Self {
        self.config.offline_after = d;
        self
    }

    /// How often expired leases and dead instances are looked for (default 1 s).
    pub fn rescue_interval(mut self, d: Duration) -> Self {
        self.config.rescue_interval = d;
        self
    }

    /// How long `shutdown` lets in-flight steps finish (default 30 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }

    /// Whether `start` applies the migrations (default true).
    pub fn migrate(mut self, on: bool) -> Self {
        self.config.migrate = on;
        self
    }

    /// How often dead rows of the pgflow tables are checked and vacuumed (default
    /// every 2 s; `None` leaves it to the server's autovacuum).
    pub fn vacuum_interval(mut self, every: Option<Duration>) -> Self {
        self.config.vacuum_interval = every;
        self
    }

    /// Prunes finished runs older than the retention's age, in batches, from one
    /// instance at a time (whichever holds the pruning lock); off by default (runs
    /// are kept). See [`Retention`](crate::Retention).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn demo() -> Result<(), pgflow_runtime::Error> {
    /// let rt = pgflow_runtime::Runtime::builder()
    ///     .queue("default", 8)
    ///     .retention(pgflow_runtime::Retention::after(Duration::from_secs(30 * 24 * 3600)))
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn retention(mut self, retention: crate::Retention) -> Self {
        self.config.retention = Some(retention);
        self
    }

    /// Fires `schedule` from this instance: each of its ticks starts a run of its
    /// workflow (exactly one per tick, however many instances register it). A
    /// runtime without queues fires its schedules too. See [`Schedule`].
    ///
    /// At start the schedule is stored in `pgflow.schedules` under its name: a new
    /// name is added with its first tick after now; a changed expression or time
    /// zone replaces the stored one and its ticks start over from now (ticks of the
    /// old expression that are due are dropped); a changed missed-tick policy or
    /// workflow replaces the stored one and keeps the due ticks. Every instance fires
    /// the schedule by the stored definition, so during a rolling deploy the last
    /// instance to start with a changed definition sets it for all.
    ///
    /// ```no_run
    /// # use pgflow::{workflow, StepError};
    /// # pub struct Cleanup;
    /// # #[workflow] impl Cleanup { #[step] async fn run(n: ()) -> Result<(), StepError> { Ok(n) } }
    /// use pgflow_runtime::{Missed, Runtime, Schedule};
    ///
    /// # async fn demo() -> Result<(), pgflow_runtime::Error> {
    /// let rt = Runtime::builder()
    ///     .queue("default", 4)
    ///     .schedule(Schedule::cron::<Cleanup>("cleanup", "*/5 * * * *", |_| ())?.missed(Missed::Skip))
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Pool size when the runtime connects itself (default 10).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.config.max_connections = n.max(2);
        self
    }

    /// Connects, migrates, registers every linked workflow and starts the workers.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] when the database cannot be reached; [`Error::Migrate`];
    /// [`Error::Registry`] for two workflows with one name and version;
    /// [`Error::DefinitionChanged`] for a changed definition under an old version;
    /// [`Error::InvalidSchedule`] for two schedules with one name.
    pub async fn start(self) -> Result<Runtime, Error> {
        for (q, c) in &self.queues {
            if *c == 0 || q.is_empty() {
                return Err(Error::Config(format!(
                    "queue {q:?} needs a name and a concurrency of at least 1"
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
        for l in &self.config.limits {
            if let Some(p) = l.problem() {
                return Err(Error::Config(p));
            }
            if !names.insert(l.name()) {
                return Err(Error::Config(format!(
                    "two limits are named `{}`",
                    l.name()
                )));
            }
        }
        for (q, limit) in &self.config.key_limits {
            if *limit == 0 || !self.queues.iter().any(|(s, _)| s == q) {
                return Err(Error::Config(format!(
                    "key_concurrency({q:?}, {limit}): the limit must be at least 1, on a queue this runtime serves"
                )));
            }
        }
        let pool = match self.pool {
            Some(p) => p,
            None => connect(self.url, self.config.max_connections, self.queues.len()).await?,
        };
        if self.config.migrate {
            crate::migrate(&pool).await?;
        }
        let registry = pgflow::registry()?;
        let defs: Vec<&'static WorkflowDef> = registry.workflows().to_vec();
        // Every limit a served step counts against is defined here.
        for d in defs
            .iter()
            .filter(|d| self.queues.iter().any(|(q, _)| q == d.queue()))
        {
            for s in d.steps() {
                if let Some(missing) = s.limits().iter().find(|l| !names.contains(**l)) {
                    return Err(Error::Config(format!(
                        "step `{}` of workflow `{}` counts against limit `{missing}`, which this runtime does not define: add `.limit(Limit::..(\"{missing}\", ..))`",
                        s.name(),
                        d.name()
                    )));
                }
            }
        }
        register_definitions(&pool, &defs).await?;
        crate::schedule::register(&pool, &defs, &self.schedules).await?;
        let instance_id = self.instance_id.unwrap_or_else(default_instance_id);
        if instance_id.is_empty() {
            return Err(Error::Config("the instance id is empty".into()));
        }
        let live = crate::engine::live_key(&pool, &instance_id);
        if !crate::engine::hold_live(&live) {
            return Err(Error::InstanceIdInUse {
                id: instance_id,
                host: hostname(),
                pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
                heartbeat_secs_ago: 0.0,
            });
        }
        let served: Vec<String> = defs
            .iter()
            .filter(|d| self.queues.iter().any(|(q, _)| q == d.queue()))
            .map(|d| instances::served_key(d.name(), version_i32(d.version())))
            .collect();
        let registered = register_instance(
            &pool,
            &instance_id,
            &self.queues,
            &served,
            self.config.offline_after,
        )
        .await;
        if let Err(e) = registered {
            crate::engine::release_live(&live);
            return Err(e);
        }
        let catalog = Catalog::new(&defs, self.config.lease_grace);
        let (engine, completions) = Engine::new(
            pool,
            instance_id,
            catalog,
            self.data,
            self.config,
            self.queues,
        );
        // Claims still held under this id belong to a predecessor that is gone
        // (a dead process whose id we took over, or one that shut down with claims
        // left): give them back before claiming anything.
        loop {
            match rescue_once(&engine, Some(&engine.instance_id)).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    crate::engine::release_live(&live);
                    return Err(e.into());
                }
            }
        }
        engine.start_loops(completions, self.schedules.into());
        Ok(Runtime::new(engine))
    }
}

/// Connects a pool to `url` (or `$DATABASE_URL`), probing first (see `connect`).
async fn connect(
    url: Option<String>,
    max_connections: u32,
    queues: usize,
) -> Result<PgPool, Error> {
    let url = url
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .ok_or_else(|| {
            Error::Config(
                "no database: call .database_url(..) or .pool(..), or set DATABASE_URL".into(),
            )
        })?;
    // Outside the pool: one connection per claimer (LISTEN holds one of the pool's).
    let others = u32::try_from(queues).unwrap_or(u32::MAX);
    crate::connect::pool(&url, max_connections, others).await
}

fn default_instance_id() -> String {
    std::env::var("INSTANCE_ID")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()))
}

fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Stores each linked definition (one round trip) and compares those stored
/// before: a definition that changed under the same version is refused with the
/// first differences, so a changed workflow must get a new version (runs in flight
/// keep the step table they started with).
async fn register_definitions(pool: &PgPool, defs: &[&'static WorkflowDef]) -> Result<(), Error> {
    if defs.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = defs.iter().map(|d| d.name()).collect();
    let versions: Vec<i32> = defs.iter().map(|d| version_i32(d.version())).collect();
    let described: Vec<Value> = defs.iter().map(|d| d.describe()).collect();
    let texts: Vec<String> = described.iter().map(Value::to_string).collect();
    for row in definitions::register(pool, &names, &versions, &texts).await? {
        let Some(i) = defs
            .iter()
            .position(|d| d.name() == row.name && version_i32(d.version()) == row.version)
        else {
            continue;
        };
        let stored: Value =
            serde_json::from_str(&row.definition).map_err(|e| Error::DefinitionChanged {
                workflow: row.name.clone(),
                version: defs[i].version(),
                difference: format!("the stored definition is not readable: {e}"),
            })?;
        let mut diffs = Vec::new();
        diff("", &stored, &described[i], &mut diffs);
        if !diffs.is_empty() {
            let shown = diffs.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
            let more = diffs.len().saturating_sub(5);
            return Err(Error::DefinitionChanged {
                workflow: row.name,
                version: defs[i].version(),
                difference: if more > 0 {
                    format!("{shown}; and {more} more")
                } else {
                    shown
                },
            });
        }
    }
    Ok(())
}

/// Lists the paths where `old` and `new` differ: `steps[1].timeout_ms: 30000 -> 10000`.
fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            out.push(format!(
                "{path}: {} entries -> {} entries",
                a.len(),
                b.len()
            ));
        }
        _ if old != new => out.push(format!("{path}: {old} -> {new}")),
        _ => {}
    }
}

/// Registers this runtime under `id`, refusing an id held by a live instance.
///
/// Two live runtimes cannot share an id. A restart with the id of a process that is
/// gone (same host, its pid no longer exists, or its pid is ours and no runtime of
/// this process holds the id) or whose heartbeat expired takes the id over.
async fn register_instance(
    pool: &PgPool,
    id: &str,
    queues: &[(String, usize)],
    served: &[String],
    offline_after: Duration,
) -> Result<(), Error> {
    let host = hostname();
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let queue_map: BTreeMap<&str, usize> = queues.iter().map(|(q, c)| (q.as_str(), *c)).collect();
    let queues_json = serde_json::to_string(&queue_map).unwrap_or_else(|_| "{}".to_owned());
    let capacity = i32::try_from(queues.iter().map(|q| q.1).sum::<usize>()).unwrap_or(i32::MAX);
    let registration = Registration {
        id,
        host: &host,
        pid,
        queues_json: &queues_json,
        capacity,
        served,
        offline_after,
    };
    match instances::register(pool, &registration, false).await? {
        Registered::Fresh => Ok(()),
        Registered::TookOverSilent => {
            warn!(
                instance = id,
                "pgflow: taking over the id of an instance that stopped heartbeating"
            );
            Ok(())
        }
        Registered::Held {
            host: holder_host,
            pid: holder_pid,
            heartbeat_secs_ago,
        } => {
            // Held by an instance whose heartbeat is fresh: is it a dead process here?
            // Another pid that no longer exists; or our own pid (a container whose
            // process is PID 1 every time) while no runtime of this process holds
            // the id: a previous incarnation of this process, which is gone.
            // (This runtime holds the id in this process, so no other runtime of
            // this process does.)
            let gone = holder_host == host
                && (holder_pid == pid
                    || !std::path::Path::new(&format!("/proc/{holder_pid}")).exists());
            if gone {
                warn!(
                    instance = id,
                    pid = holder_pid,
                    "pgflow: taking over the id of a process that is gone"
                );
                instances::register(pool, &registration, true).await?;
                return Ok(());
            }
            Err(Error::InstanceIdInUse {
                id: id.to_owned(),
                host: holder_host,
                pid: holder_pid,
                heartbeat_secs_ago,
            })
        }
    }
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("url", &self.url.as_deref().map(crate::mask_password))
            .field("pool", &self.pool)
            .field("queues", &self.queues)
            .field("instance_id", &self.instance_id)
            .field("data", &self.data)
            .field("config", &self.config)
            .field("schedules", &self.schedules)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_names_each_changed_path() {
        let old = json!({"steps": [{"name": "a", "timeout_ms": 30000}], "queue": "q"});
        let new = json!({"steps": [{"name": "a", "timeout_ms": 10000}], "queue": "q"});
        let mut out = Vec::new();
        diff("", &old, &new, &mut out);
        assert_eq!(out, ["steps[0].timeout_ms: 30000 -> 10000"]);
        let new = json!({"steps": [], "queue": "r"});
        let mut out = Vec::new();
        diff("", &old, &new, &mut out);
        assert_eq!(
            out,
            ["queue: \"q\" -> \"r\"", "steps: 1 entries -> 0 entries"]
        );
    }
}
