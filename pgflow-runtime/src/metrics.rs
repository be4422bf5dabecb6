//! Prometheus metrics of a runtime (feature `metrics`), in the text exposition
//! format, through the [`prometheus-client`](https://docs.rs/prometheus-client)
//! crate: serve them with [`router`] (an axum router answering `GET /metrics`), or
//! read them with [`Runtime::metrics`](crate::Runtime::metrics).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `pgflow_tasks_claimed_total` | counter | workflow, step | tasks this instance claimed |
//! | `pgflow_step_attempts_total` | counter | workflow, step, outcome | attempts that ended: `succeeded`, `skipped`, `failed` (for good), `retried`, `snoozed`, `throttled`, `over_budget`, `released`, `discarded`, `subflow` |
//! | `pgflow_completions_rejected_total` | counter | workflow, step | completions refused by the fence (the claim was lost) |
//! | `pgflow_step_duration_seconds` | histogram | workflow, step | an attempt's run time |
//! | `pgflow_task_wait_seconds` | histogram | workflow, step | due to claimed: for a run's first step, start to first step |
//! | `pgflow_flush_size` | histogram | | completions per flush |
//! | `pgflow_flush_duration_seconds` | histogram | | one flush transaction |
//! | `pgflow_instance_load` | gauge | | steps executing now |
//! | `pgflow_instance_capacity` | gauge | | the sum of the served queues' concurrency |
//! | `pgflow_queue_due` | gauge | queue | tasks due and unclaimed (read at scrape) |
//! | `pgflow_queue_running` | gauge | queue | tasks claimed (read at scrape) |
//! | `pgflow_queue_oldest_due_seconds` | gauge | queue | how long the oldest due task has waited (read at scrape) |
//!
//! Without the feature, recording is a no-op that compiles away.
//!
//! ```no_run
//! # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), Box<dyn std::error::Error>> {
//! // next to the application's routes, or on a port of its own:
//! let app: axum::Router = pgflow_runtime::metrics::router(rt.clone());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "metrics")]
pub(crate) use enabled::Metrics;
#[cfg(feature = "metrics")]
pub use enabled::router;
#[cfg(all(feature = "metrics", feature = "dashboard"))]
pub(crate) use enabled::{cluster_text, exposition};

#[cfg(not(feature = "metrics"))]
pub(crate) use disabled::Metrics;

/// How an attempt ended, as the `outcome` label says it.
pub(crate) fn outcome_label(o: &crate::store::flush::Outcome) -> &'static str {
    use crate::store::flush::Outcome;
    match o {
        Outcome::Succeeded(_) | Outcome::FanOut => "succeeded",
        Outcome::Skipped { .. } => "skipped",
        Outcome::Retry { .. } => "retried",
        Outcome::Snooze { .. } => "snoozed",
        Outcome::Throttled { .. } => "throttled",
        Outcome::Failed { .. } => "failed",
        Outcome::StartChild(_) | Outcome::AwaitChild { .. } => "subflow",
        Outcome::OverBudget { .. } => "over_budget",
        Outcome::Discard => "discarded",
        Outcome::Release => "released",
    }
}

#[cfg(not(feature = "metrics"))]
mod disabled {
    /// Recording without the feature: nothing.
    #[derive(Debug, Default)]
    pub(crate) struct Metrics;

    impl Metrics {
        pub(crate) fn claimed(&self, _: &'static str, _: &'static str, _: Option<f64>) {}
        pub(crate) fn attempt(&self, _: &'static str, _: &'static str, _: &'static str, _: f64) {}
        pub(crate) fn rejected(&self, _: &'static str, _: &'static str) {}
        pub(crate) fn flush(&self, _: u64, _: f64) {}
    }
}

#[cfg(feature = "metrics")]
mod enabled {
    use axum::Router;
    use axum::extract::State;
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use prometheus_client::registry::Registry;

    use std::sync::{Mutex, PoisonError, RwLock};

    use crate::Runtime;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct StepLabels {
        workflow: &'static str,
        step: &'static str,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct OutcomeLabels {
        workflow: &'static str,
        step: &'static str,
        outcome: &'static str,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct QueueLabels {
        queue: String,
    }

    type Hist = Family<StepLabels, Histogram, fn() -> Histogram>;

    /// One step's metrics, found in their families once: a family hashes its labels
    /// (SipHash, under a lock) at every lookup, and every task looked up four.
    /// Clones share their values with the family's.
    #[derive(Debug)]
    struct StepMetrics {
        claimed: Counter,
        wait: Histogram,
        duration: Histogram,
        /// The attempts by outcome (a handful), by [`label_key`] of the outcome.
        attempts: Mutex<Vec<(LabelKey, Counter)>>,
    }

    /// A `&'static str` label by address and length: the catalog's names and the
    /// outcome labels are such strings. Equal labels at other addresses only make
    /// another cache entry for the same metrics.
    type LabelKey = (usize, usize);

    fn label_key(label: &'static str) -> LabelKey {
        (label.as_ptr() as usize, label.len())
    }

    /// A runtime's metrics (see the module docs).
    #[derive(Debug)]
    pub(crate) struct Metrics {
        registry: Registry,
        claimed: Family<StepLabels, Counter>,
        attempts: Family<OutcomeLabels, Counter>,
        rejected: Family<StepLabels, Counter>,
        duration: Hist,
        wait: Hist,
        flush_size: Histogram,
        flush_seconds: Histogram,
        load: Gauge,
        capacity: Gauge,
        steps: RwLock<foldhash::HashMap<(LabelKey, LabelKey), StepMetrics>>,
    }

    /// Seconds from 0.5 ms to about 4.5 min, doubling.
    fn seconds() -> Histogram {
        Histogram::new(exponential_buckets(0.000_5, 2.0, 20))
    }

    impl Default for Metrics {
        fn default() -> Self {
            let mut registry = Registry::with_prefix("pgflow");
            let claimed = Family::<StepLabels, Counter>::default();
            let attempts = Family::<OutcomeLabels, Counter>::default();
            let rejected = Family::<StepLabels, Counter>::default();
            let duration: Hist = Family::new_with_constructor(seconds);
            let wait: Hist = Family::new_with_constructor(seconds);
            let flush_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
            let flush_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
            let (load, capacity) = (Gauge::default(), Gauge::default());
            registry.register(
                "tasks_claimed",
                "Tasks this instance claimed",
                claimed.clone(),
            );
            registry.register(
                "step_attempts",
                "Step attempts that ended, by outcome",
                attempts.clone(),
            );
            registry.register(
                "completions_rejected",
                "Completions refused by the fence: the claim was lost",
                rejected.clone(),
            );
            registry.register(
                "step_duration_seconds",
                "How long an attempt ran",
                duration.clone(),
            );
            registry.register(
                "task_wait_seconds",
                "From due to claimed (a run's first step: start to first step)",
                wait.clone(),
            );
            registry.register("flush_size", "Completions per flush", flush_size.clone());
            registry.register(
                "flush_duration_seconds",
                "One flush transaction",
                flush_seconds.clone(),
            );
            registry.register("instance_load", "Steps executing now", load.clone());
            registry.register(
                "instance_capacity",
                "The served queues' concurrency, summed",
                capacity.clone(),
            );
            Self {
                registry,
                claimed,
                attempts,
                rejected,
                duration,
                wait,
                flush_size,
                flush_seconds,
                load,
                capacity,
                steps: RwLock::default(),
            }
        }
    }

    impl Metrics {
        /// A task of `workflow`'s `step` was claimed, `wait` seconds after it was due.
        pub(crate) fn claimed(
            &self,
            workflow: &'static str,
            step: &'static str,
            wait: Option<f64>,
        ) {
            self.with_step(workflow, step, |m| {
                m.claimed.inc();
                if let Some(w) = wait {
                    m.wait.observe(w.max(0.0));
                }
            });
        }

        /// Calls `f` with `workflow`'s `step`'s metrics (shared by every thread: a
        /// read lock), found in their families the first time.
        fn with_step(
            &self,
            workflow: &'static str,
            step: &'static str,
            f: impl FnOnce(&StepMetrics),
        ) {
            let key = (label_key(workflow), label_key(step));
            {
                let steps = self.steps.read().unwrap_or_else(PoisonError::into_inner);
                if let Some(m) = steps.get(&key) {
                    f(m);
                    return;
                }
            }
            let l = StepLabels { workflow, step };
            let made = StepMetrics {
                claimed: self.claimed.get_or_create(&l).clone(),
                wait: self.wait.get_or_create(&l).clone(),
                duration: self.duration.get_or_create(&l).clone(),
                attempts: Mutex::default(),
            };
            let mut steps = self.steps.write().unwrap_or_else(PoisonError::into_inner);
            f(steps.entry(key).or_insert(made));
        }

        /// An attempt ended with `outcome` after `secs` seconds.
        pub(crate) fn attempt(
            &self,
            workflow: &'static str,
            step: &'static str,
            outcome: &'static str,
            secs: f64,
        ) {
            self.with_step(workflow, step, |m| {
                let at = label_key(outcome);
                let mut attempts = m.attempts.lock().unwrap_or_else(PoisonError::into_inner);
                match attempts.iter().find(|(o, _)| *o == at) {
                    Some((_, c)) => {
                        c.inc();
                    }
                    None => {
                        let c = self
                            .attempts
                            .get_or_create(&OutcomeLabels {
                                workflow,
                                step,
                                outcome,
                            })
                            .clone();
                        c.inc();
                        attempts.push((at, c));
                    }
                }
                drop(attempts);
                m.duration.observe(secs);
            });
        }

        /// A completion of `workflow`'s `step` was refused by the fence.
        pub(crate) fn rejected(&self, workflow: &'static str, step: &'static str) {
            self.rejected
                .get_or_create(&StepLabels { workflow, step })
                .inc();
        }

        /// A flush of `size` completions took `secs` seconds.
        pub(crate) fn flush(&self, size: u64, secs: f64) {
            self.flush_size.observe(size as f64);
            self.flush_seconds.observe(secs);
        }

        /// The text exposition: this registry, then `extra` (the queue gauges).
        fn encode(&self, load: i64, capacity: i64, extra: &Registry) -> String {
            self.load.set(load);
            self.capacity.set(capacity);
            let mut out = String::new();
            let _ = encode(&mut out, &self.registry);
            // both end with `# EOF`: one at the very end
            if let Some(head) = out.strip_suffix("# EOF\n") {
                out.truncate(head.len());
            }
            let _ = encode(&mut out, extra);
            out
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct InstanceLabels {
        instance: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct RunLabels {
        workflow: String,
        status: &'static str,
    }

    /// The queue gauges, read from the database now; with `cluster`, also every
    /// instance's load and capacity (from its heartbeat) and the runs per workflow
    /// and status (what the dashboard's endpoint adds).
    async fn from_database(pool: &sqlx::PgPool, cluster: bool) -> Result<Registry, crate::Error> {
        let parts = crate::admin::status::Parts {
            queues: true,
            instances: cluster,
            runs: cluster,
            ..Default::default()
        };
        let status = crate::admin::status::read(pool, parts).await?;
        let oldest = crate::store::tasks::oldest_due(pool).await?;
        let mut reg = Registry::with_prefix("pgflow");
        let due = Family::<QueueLabels, Gauge>::default();
        let running = Family::<QueueLabels, Gauge>::default();
        let age = Family::<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for q in &status.queues {
            let l = QueueLabels {
                queue: q.queue.clone(),
            };
            due.get_or_create(&l).set(q.available);
            running.get_or_create(&l).set(q.running);
            age.get_or_create(&l).set(0.0);
        }
        for (queue, ms) in oldest {
            age.get_or_create(&QueueLabels { queue })
                .set(ms as f64 / 1e3);
        }
        reg.register("queue_due", "Tasks due and unclaimed", due);
        reg.register("queue_running", "Tasks claimed", running);
        reg.register(
            "queue_oldest_due_seconds",
            "How long the oldest due task has waited",
            age,
        );
        if cluster {
            let load = Family::<InstanceLabels, Gauge>::default();
            let capacity = Family::<InstanceLabels, Gauge>::default();
            for i in status.instances.iter().filter(|i| i.status == "online") {
                let l = InstanceLabels {
                    instance: i.id.clone(),
                };
                load.get_or_create(&l).set(i64::from(i.load));
                capacity.get_or_create(&l).set(i64::from(i.capacity));
            }
            reg.register(
                "instances_load",
                "Steps an online instance executes, at its last heartbeat",
                load,
            );
            reg.register(
                "instances_capacity",
                "An online instance's capacity",
                capacity,
            );
            let runs = Family::<RunLabels, Gauge>::default();
            for w in &status.runs {
                for (status, n) in [
                    ("running", w.running),
                    ("succeeded", w.succeeded),
                    ("failed", w.failed),
                    ("cancelled", w.cancelled),
                ] {
                    runs.get_or_create(&RunLabels {
                        workflow: w.workflow.clone(),
                        status,
                    })
                    .set(n);
                }
            }
            reg.register("runs", "Runs in the table, by workflow and status", runs);
        }
        Ok(reg)
    }

    /// The database-wide metrics the dashboard serves at `/metrics`: queues,
    /// instances, runs per workflow and status.
    #[cfg(feature = "dashboard")]
    pub(crate) async fn cluster_text(pool: &sqlx::PgPool) -> Result<String, crate::Error> {
        let reg = from_database(pool, true).await?;
        let mut out = String::new();
        let _ = encode(&mut out, &reg);
        Ok(out)
    }

    impl Runtime {
        /// This instance's metrics in the Prometheus text format (see
        /// [`crate::metrics`]), with the queue gauges read from the database now.
        ///
        /// # Errors
        ///
        /// Database errors (reading the queues).
        pub async fn metrics(&self) -> Result<String, crate::Error> {
            let e = &self.engine;
            let extra = from_database(&e.pool, false).await?;
            let load = e.in_flight.lock().map(|m| m.len()).unwrap_or(0);
            let capacity: usize = e.queues.iter().map(|(_, n)| n).sum();
            Ok(e.metrics.encode(
                i64::try_from(load).unwrap_or(i64::MAX),
                i64::try_from(capacity).unwrap_or(i64::MAX),
                &extra,
            ))
        }
    }

    /// The response of a scrape.
    pub(crate) fn exposition(text: Result<String, crate::Error>) -> Response {
        match text {
            Ok(text) => (
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text,
            )
                .into_response(),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        }
    }

    /// An axum router answering `GET /metrics` with `rt`'s metrics (see
    /// [`crate::metrics`]).
    pub fn router(rt: Runtime) -> Router {
        Router::new().route("/metrics", get(scrape)).with_state(rt)
    }

    async fn scrape(State(rt): State<Runtime>) -> Response {
        exposition(rt.metrics().await)
    }
}
