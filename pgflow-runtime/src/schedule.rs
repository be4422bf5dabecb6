//! Cron schedules: [`Schedule`] (registered from code on the builder), [`Missed`] (the
//! missed-tick policy), [`Tick`] (what a schedule's input function receives) and
//! [`ScheduleInfo`] (a schedule as stored, for listings) — the tick arithmetic the
//! scheduler loop (`engine::scheduler`) runs on a stored schedule, and storing a
//! runtime's schedules when it starts ([`register`]).
//!
//! Expressions are parsed and evaluated by the `croner` crate, which follows the Open
//! Cron Pattern Specification, time zones come from the IANA database of `chrono-tz`.
//! Every tick is a whole second. Daylight saving time, in a schedule's time zone:
//!
//! - **A skipped hour** (clocks go forward): a *fixed-time* expression (one value each
//!   in its second, minute and hour fields, e.g. `30 2 * * *`) whose time does not exist
//!   that day fires at the first instant after the gap (03:00 when 02:00 jumps to
//!   03:00); an *interval* expression (a wildcard, range, list or step in one of those
//!   fields, e.g. `*/15 * * * *`) has no ticks in the gap.
//! - **A repeated hour** (clocks go back): a fixed-time expression fires once, at the
//!   first of the two instants; an interval expression fires in both passes (every 15
//!   minutes of real time go on through the repeated hour).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, SubsecRound, Utc};
use chrono_tz::Tz;
use croner::Cron;
use pgflow::{Workflow, WorkflowDef};
use serde::Serialize;
use sqlx::PgPool;
use tracing::info;

use crate::Error;
use crate::store::{millis, schedules};

/// What happens to the ticks of a schedule that passed while no instance could fire
/// them (every instance was down, or the database was away).
///
/// However many ticks were missed, each tick starts at most one run; the schedule
/// then goes on with its next tick after now.
///
/// ```
/// use pgflow_runtime::Missed;
/// assert_eq!(Missed::default(), Missed::RunOnce);
/// assert_eq!("run_each".parse::<Missed>().unwrap(), Missed::RunEach);
/// assert_eq!(Missed::Skip.to_string(), "skip");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Missed ticks start no run. The latest due tick still fires if it is at most
    /// the schedule's [`grace`](Schedule::grace) late (default 60 s), so a scheduler
    /// that wakes a moment late loses nothing.
    Skip,
    /// One run, for the latest missed tick (its [`Tick::previous`] says when the last
    /// run before it was due). The default.
    #[default]
    RunOnce,
    /// One run per missed tick, oldest first (at most 100 per scheduler pass, so a
    /// long outage of a frequent schedule catches up in batches).
    RunEach,
}

impl Missed {
    /// The stored name: `skip`, `run_once`, `run_each`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
            Self::RunEach => "run_each",
        }
    }
}

impl fmt::Display for Missed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Missed {
    type Err = String;

    /// Parses a stored name (`skip`, `run_once`, `run_each`; `-` may stand for `_`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().replace('-', "_").as_str() {
            "skip" => Ok(Self::Skip),
            "run_once" => Ok(Self::RunOnce),
            "run_each" => Ok(Self::RunEach),
            _ => Err(format!(
                "unknown missed-tick policy {s:?}, expected one of: skip, run_once, run_each"
            )),
        }
    }
}

/// One tick of a schedule: what its input function receives to make the input of
/// the tick's run.
///
/// ```
/// # use pgflow::{workflow, StepError};
/// # pub struct Report;
/// # #[workflow] impl Report {
/// #     #[step] async fn build(day: chrono::NaiveDate) -> Result<String, StepError> { Ok(day.to_string()) }
/// # }
/// use pgflow_runtime::{Schedule, Tick};
///
/// // Each night's run reports on the day that just ended, in Paris.
/// let nightly = Schedule::cron::<Report>("nightly_report", "0 3 * * *", |tick: &Tick| {
///     tick.local.date_naive().pred_opt().unwrap_or(tick.local.date_naive())
/// })?
/// .time_zone("Europe/Paris")?;
/// # Ok::<(), pgflow_runtime::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tick {
    /// The schedule's name.
    pub schedule: String,
    /// When the tick was due (a whole second), whenever it actually fires.
    pub at: DateTime<Utc>,
    /// The same instant on the schedule's time zone's clock, with its UTC offset.
    pub local: DateTime<FixedOffset>,
    /// The tick of the previous run this schedule started, if any: ticks between the
    /// two were missed (under [`Missed::RunOnce`] or [`Missed::Skip`]).
    pub previous: Option<DateTime<Utc>>,
}

/// A tick's input as JSON, from the user's function.
type InputFn = dyn Fn(&Tick) -> Result<String, Error> + Send + Sync;

/// A cron schedule: a workflow started at every tick of a cron expression, with an
/// input made for each tick. Register it with
/// [`RuntimeBuilder::schedule`](crate::RuntimeBuilder::schedule); every instance that
/// registers it runs it, and each tick starts exactly one run however many do.
///
/// The expression has 5 fields (`minute hour day-of-month month day-of-week`), 6
/// (seconds first) or 7 (a year last); names (`MON`, `JAN`), `L`, `W`, `#` and the
/// nicknames `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly` work. It is read in
/// UTC unless [`time_zone`](Schedule::time_zone) says otherwise. The schedule's name
/// is its identity in the database: unique per database.
///
/// ```no_run
/// use pgflow::{workflow, StepError};
/// use pgflow_runtime::{Missed, Runtime, Schedule, Tick};
///
/// pub struct NightlyReport;
/// #[workflow]
/// impl NightlyReport {
///     #[step]
///     async fn build(day: chrono::NaiveDate) -> Result<String, StepError> {
///         Ok(format!("report for {day}"))
///     }
/// }
///
/// # async fn demo() -> Result<(), pgflow_runtime::Error> {
/// let nightly = Schedule::cron::<NightlyReport>("nightly_report", "0 3 * * *", |tick: &Tick| {
///     tick.local.date_naive()
/// })?
/// .time_zone("Europe/Paris")?
/// .missed(Missed::RunOnce);
/// let rt = Runtime::builder()
///     .database_url("postgres://postgres@127.0.0.1:5432/postgres")
///     .queue("default", 4)
///     .schedule(nightly)
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Schedule {
    name: String,
    def: &'static WorkflowDef,
    expression: String,
    rule: Rule,
    input: Arc<InputFn>,
}

impl Schedule {
    /// A schedule named `name` that starts a run of `W` at every tick of the cron
    /// expression `expression`, with the input `input` makes from the [`Tick`]; in
    /// UTC, with [`Missed::RunOnce`] and a grace of 60 s until told otherwise.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError};
    /// # pub struct Cleanup;
    /// # #[workflow] impl Cleanup { #[step] async fn run(n: ()) -> Result<(), StepError> { Ok(n) } }
    /// use pgflow_runtime::Schedule;
    ///
    /// let every_5_min = Schedule::cron::<Cleanup>("cleanup", "*/5 * * * *", |_| ())?;
    /// let every_10_s = Schedule::cron::<Cleanup>("fast_cleanup", "*/10 * * * * *", |_| ())?;
    /// assert!(Schedule::cron::<Cleanup>("bad", "61 * * * *", |_| ()).is_err());
    /// # Ok::<(), pgflow_runtime::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSchedule`] for an empty name, an expression that does not
    /// parse (the message says which field and what is allowed), or one that has no
    /// tick after now (a year that is past, the 30th of February).
    pub fn cron<W: Workflow>(
        name: impl Into<String>,
        expression: &str,
        input: impl Fn(&Tick) -> W::Input + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let name = name.into();
        let invalid = |message: String| Error::InvalidSchedule {
            name: name.clone(),
            message,
        };
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(invalid(
                "a schedule needs a non-empty name without control characters".into(),
            ));
        }
        let expression = expression.trim().to_owned();
        let cron = parse_cron(&expression).map_err(invalid)?;
        let rule = Rule {
            cron,
            zone: Tz::UTC,
            missed: Missed::default(),
            grace: DEFAULT_GRACE,
        };
        if rule.next_after(Utc::now()).is_none() {
            return Err(invalid(format!(
                "the cron expression `{expression}` has no tick after now"
            )));
        }
        let def = W::definition();
        let input: Arc<InputFn> =
            Arc::new(move |tick: &Tick| crate::runtime::serialize_input(def, &input(tick)));
        Ok(Self {
            name,
            def,
            expression,
            rule,
            input,
        })
    }

    /// Reads the expression on the clock of this IANA time zone (`Europe/Paris`,
    /// `America/New_York`, `UTC`), daylight saving time included (see *Daylight
    /// saving time* below for a skipped or repeated hour).
    ///
    /// ```
    /// # use pgflow::{workflow, StepError};
    /// # pub struct Cleanup;
    /// # #[workflow] impl Cleanup { #[step] async fn run(n: ()) -> Result<(), StepError> { Ok(n) } }
    /// use pgflow_runtime::Schedule;
    ///
    /// let s = Schedule::cron::<Cleanup>("cleanup", "0 3 * * *", |_| ())?.time_zone("Europe/Paris")?;
    /// assert_eq!(s.time_zone_name(), "Europe/Paris");
    /// let e = Schedule::cron::<Cleanup>("cleanup", "0 3 * * *", |_| ())?.time_zone("europe/paris");
    /// assert!(e.unwrap_err().to_string().contains("did you mean `Europe/Paris`"));
    /// # Ok::<(), pgflow_runtime::Error>(())
    /// ```
    ///
    /// # Daylight saving time
    ///
    /// On the day clocks go forward, a fixed-time expression (one value each in its
    /// second, minute and hour fields) whose time does not exist fires at the first
    /// instant after the gap; an interval expression has no ticks in the gap. On the
    /// day clocks go back, a fixed-time expression fires once (at the first of the two
    /// instants) and an interval expression fires in both passes of the repeated hour.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSchedule`] for a name the IANA database does not know.
    pub fn time_zone(mut self, zone: &str) -> Result<Self, Error> {
        self.rule.zone = parse_zone(zone).map_err(|message| Error::InvalidSchedule {
            name: self.name.clone(),
            message,
        })?;
        Ok(self)
    }

    /// What happens to the ticks missed while no instance could fire them (default
    /// [`Missed::RunOnce`]).
    pub fn missed(mut self, policy: Missed) -> Self {
        self.rule.missed = policy;
        self
    }

    /// Under [`Missed::Skip`], how late a tick may still start its run (default 60
    /// s): a later one is missed. Other policies fire late ticks anyway. Keep it well
    /// above the scheduler's wake-up delay (milliseconds, a second or more under
    /// load): a grace shorter than that skips ticks that were on time.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.rule.grace = grace;
        self
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The workflow its ticks start.
    pub fn workflow(&self) -> &'static WorkflowDef {
        self.def
    }

    /// The cron expression, as given (trimmed).
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The IANA name of its time zone (`UTC` unless set).
    pub fn time_zone_name(&self) -> &'static str {
        self.rule.zone.name()
    }

    /// Its missed-tick policy.
    pub fn missed_policy(&self) -> Missed {
        self.rule.missed
    }

    /// The ticks after `after`, in order (for a look at what an expression means;
    /// the runtime computes ticks the same way).
    ///
    /// ```
    /// # use pgflow::{workflow, StepError};
    /// # pub struct Cleanup;
    /// # #[workflow] impl Cleanup { #[step] async fn run(n: ()) -> Result<(), StepError> { Ok(n) } }
    /// use chrono::{TimeZone, Utc};
    /// use pgflow_runtime::Schedule;
    ///
    /// // 02:30 in Paris does not exist on 2025-03-30: that tick fires at 03:00 CEST.
    /// let s = Schedule::cron::<Cleanup>("c", "30 2 * * *", |_| ())?.time_zone("Europe/Paris")?;
    /// let from = Utc.with_ymd_and_hms(2025, 3, 29, 0, 0, 0).unwrap();
    /// let ticks: Vec<String> = s.upcoming(from).take(3).map(|t| t.to_rfc3339()).collect();
    /// assert_eq!(ticks, [
    ///     "2025-03-29T01:30:00+00:00", // 02:30 CET
    ///     "2025-03-30T01:00:00+00:00", // no 02:30 that day: 03:00 CEST
    ///     "2025-03-31T00:30:00+00:00", // 02:30 CEST
    /// ]);
    /// # Ok::<(), pgflow_runtime::Error>(())
    /// ```
    pub fn upcoming(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let mut at = after;
        std::iter::from_fn(move || {
            let next = self.rule.next_after(at)?;
            at = next;
            Some(next)
        })
    }

    /// The input this schedule makes for its tick at `at` (as JSON; with
    /// [`Tick::previous`] `None`): to test an input function without a database.
    ///
    /// ```
    /// # use pgflow::{workflow, StepError};
    /// # pub struct Echo;
    /// # #[workflow] impl Echo { #[step] async fn run(s: String) -> Result<String, StepError> { Ok(s) } }
    /// use chrono::{TimeZone, Utc};
    /// use pgflow_runtime::Schedule;
    ///
    /// let s = Schedule::cron::<Echo>("echo", "0 * * * *", |t| t.local.format("%H:%M").to_string())?
    ///     .time_zone("Asia/Tokyo")?;
    /// let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    /// assert_eq!(s.input_at(at)?, serde_json::json!("09:00"));
    /// # Ok::<(), pgflow_runtime::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the input does not serialize, or the function
    /// panicked.
    pub fn input_at(&self, at: DateTime<Utc>) -> Result<serde_json::Value, Error> {
        let tick = self.rule.tick(&self.name, at, None);
        let json = self.input(&tick)?;
        serde_json::from_str(&json).map_err(|e| Error::InvalidInput {
            workflow: self.def.name().to_owned(),
            message: e.to_string(),
        })
    }

    /// The tick's input as JSON; a panic of the user's function is an error.
    pub(crate) fn input(&self, tick: &Tick) -> Result<String, Error> {
        let f = &self.input;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tick))).unwrap_or_else(|p| {
            let message = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(Error::InvalidInput {
                workflow: self.def.name().to_owned(),
                message: format!(
                    "the input function of schedule `{}` panicked: {message}",
                    self.name
                ),
            })
        })
    }

    /// The parsed rule (expression, zone, policy, grace) as registered in code.
    pub(crate) fn rule(&self) -> &Rule {
        &self.rule
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("name", &self.name)
            .field("workflow", &self.def.name())
            .field("expression", &self.expression)
            .field("time_zone", &self.rule.zone.name())
            .field("missed", &self.rule.missed)
            .field("grace", &self.rule.grace)
            .finish_non_exhaustive()
    }
}

/// A schedule as stored in `pgflow.schedules` (see [`Runtime::schedules`] and
/// [`admin::schedules`](crate::admin::schedules())).
///
/// [`Runtime::schedules`]: crate::Runtime::schedules
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleInfo {
    /// Its name.
    pub name: String,
    /// The workflow its ticks start.
    pub workflow: String,
    /// The cron expression.
    pub cron: String,
    /// The IANA time zone the expression is read in.
    pub time_zone: String,
    /// The missed-tick policy.
    pub missed: Missed,
    /// Under [`Missed::Skip`], how late a tick may still fire, in milliseconds.
    pub grace_ms: i64,
    /// The next tick to fire (`None`: the expression has no tick left).
    pub next_tick: Option<DateTime<Utc>>,
    /// Milliseconds from now (the database's clock) to the next tick; negative when
    /// it is overdue — no instance that registers the schedule is running, or all are
    /// late.
    pub next_in_ms: Option<i64>,
    /// The tick of the last run it started.
    pub last_tick: Option<DateTime<Utc>>,
    /// That run's id.
    pub last_run_id: Option<i64>,
    /// That run's status (`running`, `succeeded`, `failed`, `cancelled`).
    pub last_run_status: Option<String>,
    /// When it was first registered.
    pub created_at: DateTime<Utc>,
    /// When an instance last changed its definition.
    pub updated_at: DateTime<Utc>,
}

impl ScheduleInfo {
    /// How late its next tick is, if it is past: a schedule overdue by more than a
    /// few seconds has no instance running it (those that registered it are down, or
    /// none registers it any more — remove it then).
    ///
    /// ```
    /// # fn demo(s: pgflow_runtime::ScheduleInfo) {
    /// if s.overdue().is_some_and(|d| d.as_secs() > 60) {
    ///     eprintln!("schedule {} is not firing", s.name);
    /// }
    /// # }
    /// ```
    pub fn overdue(&self) -> Option<Duration> {
        self.next_in_ms
            .filter(|ms| *ms < 0)
            .map(|ms| Duration::from_millis(ms.unsigned_abs()))
    }
}

/// The default grace of [`Missed::Skip`].
const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// An expression with its zone and missed-tick policy: what tick arithmetic needs.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    cron: Cron,
    zone: Tz,
    pub(crate) missed: Missed,
    pub(crate) grace: Duration,
}

/// The ticks a scheduler pass fires, and the schedule's next tick after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Due {
    /// Oldest first; may be empty (missed ticks that [`Missed::Skip`] drops).
    pub(crate) ticks: Vec<DateTime<Utc>>,
    /// The next tick to fire (still due when a [`Missed::RunEach`] catch-up hit its
    /// cap); `None` when the expression has no tick left.
    pub(crate) next: Option<DateTime<Utc>>,
}

impl Rule {
    /// A stored schedule's rule.
    pub(crate) fn parse(
        expression: &str,
        zone: &str,
        missed: &str,
        grace_ms: i64,
    ) -> Result<Self, String> {
        Ok(Self {
            cron: parse_cron(expression)?,
            zone: parse_zone(zone)?,
            missed: missed.parse()?,
            grace: Duration::from_millis(u64::try_from(grace_ms).unwrap_or(0)),
        })
    }

    /// The IANA name of the zone.
    pub(crate) fn zone_name(&self) -> &'static str {
        self.zone.name()
    }

    /// The first tick strictly after `t`.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = t.trunc_subsecs(0).with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&from, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last tick at or before `t`.
    fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = t.trunc_subsecs(0).with_timezone(&self.zone);
        self.cron
            .find_previous_occurrence(&from, true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The tick at `at` as the input function sees it.
    pub(crate) fn tick(
        &self,
        schedule: &str,
        at: DateTime<Utc>,
        previous: Option<DateTime<Utc>>,
    ) -> Tick {
        Tick {
            schedule: schedule.to_owned(),
            at,
            local: at.with_timezone(&self.zone).fixed_offset(),
            previous,
        }
    }

    /// What to fire at `now` for a schedule whose next tick is `next_tick` (due: at or
    /// before `now`), by the missed-tick policy: each due tick up to `cap` of them
    /// ([`Missed::RunEach`]), or the latest one ([`Missed::RunOnce`], and
    /// [`Missed::Skip`] if it is at most the grace late); then the next tick.
    pub(crate) fn due(&self, next_tick: DateTime<Utc>, now: DateTime<Utc>, cap: usize) -> Due {
        if next_tick > now {
            return Due {
                ticks: Vec::new(),
                next: Some(next_tick),
            };
        }
        match self.missed {
            Missed::RunEach => {
                let mut ticks = Vec::new();
                let mut next = Some(next_tick);
                while let Some(t) = next {
                    if t > now || ticks.len() >= cap.max(1) {
                        break;
                    }
                    ticks.push(t);
                    next = self.next_after(t);
                }
                Due { ticks, next }
            }
            Missed::RunOnce | Missed::Skip => {
                // The latest due tick: at or after the stored one.
                let latest = self
                    .last_at_or_before(now)
                    .filter(|t| *t >= next_tick)
                    .unwrap_or(next_tick);
                let late = (now - latest).to_std().unwrap_or_default();
                let fire = self.missed == Missed::RunOnce || late <= self.grace;
                Due {
                    ticks: if fire { vec![latest] } else { Vec::new() },
                    next: self.next_after(now.max(latest)),
                }
            }
        }
    }
}

/// Stores the schedules registered on the builder (see [`RuntimeBuilder::schedule`](crate::RuntimeBuilder::schedule)):
/// new ones with their first tick after now (the database's clock), changed ones
/// updated; unchanged rows are not written, so their due ticks survive a restart.
pub(crate) async fn register(
    pool: &PgPool,
    defs: &[&'static WorkflowDef],
    list: &[Schedule],
) -> Result<(), Error> {
    if list.is_empty() {
        return Ok(());
    }
    for (i, s) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.name() == s.name()) {
            return Err(Error::InvalidSchedule {
                name: s.name().to_owned(),
                message: "registered twice on this builder: schedule names are unique".into(),
            });
        }
        let w = s.workflow();
        if !defs
            .iter()
            .any(|d| d.name() == w.name() && d.version() == w.version())
        {
            return Err(Error::UnknownWorkflow {
                name: w.name().to_owned(),
                version: Some(w.version()),
                registered: crate::runtime::registered_names(),
            });
        }
    }
    let names: Vec<&str> = list.iter().map(Schedule::name).collect();
    let mut tx = pool.begin().await?;
    let (now, stored) = schedules::lock_for_register(&mut tx, &names).await?;
    let mut new = schedules::NewSchedules::default();
    for s in list {
        let rule = s.rule();
        let grace_ms = millis(rule.grace);
        let (zone, missed) = (rule.zone_name(), rule.missed.as_str());
        match stored.iter().find(|r| r.name == s.name()) {
            None => info!(
                schedule = s.name(),
                workflow = s.workflow().name(),
                cron = s.expression(),
                time_zone = zone,
                "pgflow: schedule registered"
            ),
            Some(old) => {
                let mut changes = Vec::new();
                for (what, before, after) in [
                    ("workflow", old.workflow.as_str(), s.workflow().name()),
                    ("cron", old.cron.as_str(), s.expression()),
                    ("time zone", old.time_zone.as_str(), zone),
                    ("missed", old.missed.as_str(), missed),
                ] {
                    if before != after {
                        changes.push(format!("{what} `{before}` -> `{after}`"));
                    }
                }
                if old.grace_ms != grace_ms {
                    changes.push(format!("grace {}ms -> {grace_ms}ms", old.grace_ms));
                }
                if !changes.is_empty() {
                    info!(
                        schedule = s.name(),
                        "pgflow: schedule changed: {}",
                        changes.join(", ")
                    );
                }
            }
        }
        new.names.push(s.name());
        new.workflows.push(s.workflow().name());
        new.crons.push(s.expression());
        new.time_zones.push(zone);
        new.missed.push(missed);
        new.grace_ms.push(grace_ms);
        new.next_ticks.push(rule.next_after(now));
    }
    schedules::register(&mut tx, &new).await?;
    tx.commit().await?;
    Ok(())
}

/// The idempotency key of a schedule's tick: `schedule:<name>:<tick, RFC 3339 UTC>`.
pub(crate) fn tick_key(schedule: &str, tick: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule}:{}",
        tick.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

fn parse_cron(expression: &str) -> Result<Cron, String> {
    expression.parse::<Cron>().map_err(|e| {
        format!(
            "invalid cron expression `{expression}`: {e} (expected 5 fields `minute hour \
             day-of-month month day-of-week`, 6 with seconds first or 7 with a year last, \
             e.g. `0 3 * * *` or `*/10 * * * * *`)"
        )
    })
}

fn parse_zone(zone: &str) -> Result<Tz, String> {
    let zone = zone.trim();
    zone.parse::<Tz>().map_err(|_| {
        let close = chrono_tz::TZ_VARIANTS
            .iter()
            .find(|z| z.name().eq_ignore_ascii_case(zone));
        match close {
            Some(z) => format!("unknown time zone `{zone}`; did you mean `{}`?", z.name()),
            None => format!(
                "unknown time zone `{zone}`: expected an IANA name such as `UTC`, \
                 `Europe/Paris` or `America/New_York`"
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn rule(expr: &str, zone: &str, missed: Missed) -> Rule {
        Rule::parse(expr, zone, missed.as_str(), 60_000).expect("a valid rule")
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn ticks(r: &Rule, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = from;
        while out.len() < n {
            at = r.next_after(at).expect("a next tick");
            out.push(at);
        }
        out
    }

    #[test]
    fn five_six_and_seven_fields() {
        let r = rule("0 3 * * *", "UTC", Missed::RunOnce);
        assert_eq!(
            r.next_after(utc(2026, 1, 1, 3, 0, 0)),
            Some(utc(2026, 1, 2, 3, 0, 0))
        );
        let r = rule("*/10 * * * * *", "UTC", Missed::RunOnce);
        assert_eq!(
            ticks(&r, utc(2026, 1, 1, 0, 0, 5), 2),
            [utc(2026, 1, 1, 0, 0, 10), utc(2026, 1, 1, 0, 0, 20)]
        );
        let r = rule("0 0 0 1 1 * 2030", "UTC", Missed::RunOnce);
        assert_eq!(
            r.next_after(utc(2026, 1, 1, 0, 0, 0)),
            Some(utc(2030, 1, 1, 0, 0, 0))
        );
        assert_eq!(r.next_after(utc(2030, 1, 1, 0, 0, 0)), None);
    }

    #[test]
    fn next_after_is_strict_and_ignores_subseconds() {
        let r = rule("* * * * * *", "UTC", Missed::RunOnce);
        let t = utc(2026, 1, 1, 0, 0, 0) + chrono::Duration::milliseconds(500);
        assert_eq!(r.next_after(t), Some(utc(2026, 1, 1, 0, 0, 1)));
    }

    #[test]
    fn bad_expressions_and_zones_are_clear() {
        let e = parse_cron("61 * * * *").unwrap_err();
        assert!(e.contains("invalid cron expression `61 * * * *`"), "{e}");
        assert!(e.contains("expected 5 fields"), "{e}");
        assert!(parse_cron("* * *").is_err());
        assert!(parse_cron("").is_err());
        let e = parse_zone("Europe/Pariss").unwrap_err();
        assert!(e.contains("unknown time zone `Europe/Pariss`"), "{e}");
        let e = parse_zone("europe/paris").unwrap_err();
        assert!(e.contains("did you mean `Europe/Paris`"), "{e}");
        assert_eq!(
            parse_zone("America/New_York").unwrap().name(),
            "America/New_York"
        );
    }

    #[test]
    fn on_time_ticks_fire_once_under_every_policy() {
        for missed in [Missed::Skip, Missed::RunOnce, Missed::RunEach] {
            let r = rule("0 * * * * *", "UTC", missed);
            let tick = utc(2026, 1, 1, 0, 1, 0);
            // Woken 300 ms late.
            let now = tick + chrono::Duration::milliseconds(300);
            assert_eq!(
                r.due(tick, now, 100),
                Due {
                    ticks: vec![tick],
                    next: Some(utc(2026, 1, 1, 0, 2, 0))
                },
                "{missed}"
            );
            // Not due yet.
            let early = tick - chrono::Duration::milliseconds(1);
            assert!(r.due(tick, early, 100).ticks.is_empty(), "{missed}");
        }
    }

    #[test]
    fn missed_ticks_follow_the_policy() {
        // Due at 00:01, the scheduler is back at 00:05:30: ticks 00:01 ... 00:05 missed.
        let next_tick = utc(2026, 1, 1, 0, 1, 0);
        let now = utc(2026, 1, 1, 0, 5, 30);
        let after = Some(utc(2026, 1, 1, 0, 6, 0));

        let each = rule("0 * * * * *", "UTC", Missed::RunEach);
        let due = each.due(next_tick, now, 100);
        assert_eq!(
            due.ticks,
            (1..=5)
                .map(|m| utc(2026, 1, 1, 0, m, 0))
                .collect::<Vec<_>>()
        );
        assert_eq!(due.next, after);
        // Capped: the rest is still due for the next pass.
        let due = each.due(next_tick, now, 2);
        assert_eq!(
            due.ticks,
            [utc(2026, 1, 1, 0, 1, 0), utc(2026, 1, 1, 0, 2, 0)]
        );
        assert_eq!(due.next, Some(utc(2026, 1, 1, 0, 3, 0)));

        let once = rule("0 * * * * *", "UTC", Missed::RunOnce);
        let due = once.due(next_tick, now, 100);
        assert_eq!(due.ticks, [utc(2026, 1, 1, 0, 5, 0)], "the latest only");
        assert_eq!(due.next, after);

        // Skip: the latest (30 s late) is within the 60 s grace and fires...
        let skip = rule("0 * * * * *", "UTC", Missed::Skip);
        let due = skip.due(next_tick, now, 100);
        assert_eq!(due.ticks, [utc(2026, 1, 1, 0, 5, 0)]);
        assert_eq!(due.next, after);
        // ...a nightly tick 6 hours late does not; nor under a smaller grace.
        let nightly = rule("0 3 * * *", "UTC", Missed::Skip);
        let due = nightly.due(utc(2026, 1, 1, 3, 0, 0), utc(2026, 1, 1, 9, 0, 0), 100);
        assert!(due.ticks.is_empty());
        assert_eq!(due.next, Some(utc(2026, 1, 2, 3, 0, 0)));
        let mut strict = rule("0 * * * * *", "UTC", Missed::Skip);
        strict.grace = Duration::from_secs(10);
        assert!(strict.due(next_tick, now, 100).ticks.is_empty());
        let nightly = rule("0 3 * * *", "UTC", Missed::RunOnce);
        let due = nightly.due(utc(2026, 1, 1, 3, 0, 0), utc(2026, 1, 3, 9, 0, 0), 100);
        assert_eq!(due.ticks, [utc(2026, 1, 3, 3, 0, 0)]);
        assert_eq!(due.next, Some(utc(2026, 1, 4, 3, 0, 0)));
    }

    #[test]
    fn an_exhausted_expression_has_no_next_tick() {
        let r = rule("0 0 0 1 1 * 2026", "UTC", Missed::RunEach);
        let due = r.due(utc(2026, 1, 1, 0, 0, 0), utc(2026, 6, 1, 0, 0, 0), 100);
        assert_eq!(due.ticks, [utc(2026, 1, 1, 0, 0, 0)]);
        assert_eq!(due.next, None);
    }

    #[test]
    fn ticks_are_read_in_the_time_zone() {
        // 03:00 in Paris: 02:00 UTC in winter, 01:00 UTC in summer.
        let r = rule("0 3 * * *", "Europe/Paris", Missed::RunOnce);
        assert_eq!(
            r.next_after(utc(2026, 1, 10, 12, 0, 0)),
            Some(utc(2026, 1, 11, 2, 0, 0))
        );
        assert_eq!(
            r.next_after(utc(2026, 7, 10, 12, 0, 0)),
            Some(utc(2026, 7, 11, 1, 0, 0))
        );
        let t = r.tick("n", utc(2026, 7, 11, 1, 0, 0), None);
        assert_eq!(t.local.to_rfc3339(), "2026-07-11T03:00:00+02:00");
        assert_eq!(r.zone_name(), "Europe/Paris");
    }

    #[test]
    fn dst_skipped_hour() {
        // Europe/Paris, 2025-03-30: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        // A fixed-time tick in the gap fires at the first instant after it.
        let fixed = rule("30 2 * * *", "Europe/Paris", Missed::RunEach);
        assert_eq!(
            ticks(&fixed, utc(2025, 3, 29, 12, 0, 0), 2),
            [utc(2025, 3, 30, 1, 0, 0), utc(2025, 3, 31, 0, 30, 0)]
        );
        // An interval expression has no ticks in the gap.
        let every_15 = rule("*/15 * * * *", "Europe/Paris", Missed::RunEach);
        assert_eq!(
            ticks(&every_15, utc(2025, 3, 30, 0, 30, 0), 3),
            [
                utc(2025, 3, 30, 0, 45, 0), // 01:45 CET
                utc(2025, 3, 30, 1, 0, 0),  // 03:00 CEST
                utc(2025, 3, 30, 1, 15, 0), // 03:15 CEST
            ]
        );
        // Missed ticks across the gap: each one, and the latest one, agree.
        let due = fixed.due(utc(2025, 3, 29, 1, 30, 0), utc(2025, 3, 30, 1, 10, 0), 100);
        assert_eq!(
            due.ticks,
            [utc(2025, 3, 29, 1, 30, 0), utc(2025, 3, 30, 1, 0, 0)]
        );
        let once = rule("30 2 * * *", "Europe/Paris", Missed::RunOnce);
        let due = once.due(utc(2025, 3, 29, 1, 30, 0), utc(2025, 3, 30, 1, 10, 0), 100);
        assert_eq!(due.ticks, [utc(2025, 3, 30, 1, 0, 0)]);
        assert_eq!(due.next, Some(utc(2025, 3, 31, 0, 30, 0)));
    }

    #[test]
    fn dst_repeated_hour() {
        // Europe/Paris, 2025-10-26: 03:00 CEST goes back to 02:00 CET; 02:30 happens
        // at 00:30 UTC and at 01:30 UTC. A fixed-time expression fires once, first.
        let fixed = rule("30 2 * * *", "Europe/Paris", Missed::RunEach);
        assert_eq!(
            ticks(&fixed, utc(2025, 10, 25, 12, 0, 0), 2),
            [utc(2025, 10, 26, 0, 30, 0), utc(2025, 10, 27, 1, 30, 0)]
        );
        // An interval expression fires in both passes: every 30 minutes of real time.
        let every_30 = rule("*/30 * * * *", "Europe/Paris", Missed::RunEach);
        assert_eq!(
            ticks(&every_30, utc(2025, 10, 25, 23, 45, 0), 5),
            [
                utc(2025, 10, 26, 0, 0, 0),  // 02:00 CEST
                utc(2025, 10, 26, 0, 30, 0), // 02:30 CEST
                utc(2025, 10, 26, 1, 0, 0),  // 02:00 CET
                utc(2025, 10, 26, 1, 30, 0), // 02:30 CET
                utc(2025, 10, 26, 2, 0, 0),  // 03:00 CET
            ]
        );
        // The latest tick at or before a time in the second pass is in that pass.
        let once = rule("*/30 * * * *", "Europe/Paris", Missed::RunOnce);
        let due = once.due(utc(2025, 10, 26, 0, 0, 0), utc(2025, 10, 26, 1, 40, 0), 100);
        assert_eq!(due.ticks, [utc(2025, 10, 26, 1, 30, 0)]);
        assert_eq!(due.next, Some(utc(2025, 10, 26, 2, 0, 0)));
        // A fixed-time tick missed over the repeated hour fires once, not twice.
        let once = rule("30 2 * * *", "Europe/Paris", Missed::RunOnce);
        let due = once.due(
            utc(2025, 10, 26, 0, 30, 0),
            utc(2025, 10, 26, 1, 45, 0),
            100,
        );
        assert_eq!(due.ticks, [utc(2025, 10, 26, 0, 30, 0)]);
        assert_eq!(due.next, Some(utc(2025, 10, 27, 1, 30, 0)));
    }

    #[test]
    fn tick_keys_are_utc_to_the_second() {
        assert_eq!(
            tick_key("nightly", utc(2026, 3, 1, 2, 0, 0)),
            "schedule:nightly:2026-03-01T02:00:00Z"
        );
    }

    #[test]
    fn missed_names_round_trip() {
        for m in [Missed::Skip, Missed::RunOnce, Missed::RunEach] {
            assert_eq!(m.as_str().parse::<Missed>(), Ok(m));
        }
        assert_eq!("run-each".parse::<Missed>(), Ok(Missed::RunEach));
        assert!(
            "sometimes"
                .parse::<Missed>()
                .unwrap_err()
                .contains("expected one of")
        );
    }
}
