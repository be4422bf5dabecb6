//! Cron schedules against the real Postgres: firing (one run per tick with several
//! runtimes on one database), the missed-tick policies after every instance was
//! down (simulated by moving `next_tick` into the past between two starts), a
//! changed definition, listing, removal, an input function that panics, and the
//! errors of a bad schedule. Each `#[sqlx::test]` has its own database. Ticks are
//! whole seconds, so the firing tests take a few seconds each.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgflow::{StepError, workflow};
use pgflow_runtime::{Error, Missed, Runtime, Schedule, Tick, admin};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The input each tick gives: what the tick looked like to the input function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    pub at: DateTime<Utc>,
    pub local: String,
    pub previous: Option<DateTime<Utc>>,
}

pub struct Stamped;

#[workflow(name = "sched_stamp", queue = "sched")]
impl Stamped {
    #[step]
    async fn stamp(s: Stamp) -> Result<String, StepError> {
        Ok(s.at.to_rfc3339())
    }
}

fn stamp(tick: &Tick) -> Stamp {
    Stamp {
        at: tick.at,
        local: tick.local.to_rfc3339(),
        previous: tick.previous,
    }
}

/// Every second, each tick run even when the scheduler is late (no gaps to flake).
fn every_second(name: &str) -> Schedule {
    Schedule::cron::<Stamped>(name, "* * * * * *", stamp)
        .unwrap()
        .missed(Missed::RunEach)
}

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(1);

async fn runtime(pool: &PgPool, queue: bool, schedules: Vec<Schedule>) -> Runtime {
    let id = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    let mut b = Runtime::builder()
        .pool(pool.clone())
        .instance_id(format!("sched-instance-{id}"))
        .poll_interval(Duration::from_millis(50));
    if queue {
        b = b.queue("sched", 4);
    }
    for s in schedules {
        b = b.schedule(s);
    }
    b.start().await.unwrap()
}

/// The runs of `sched_stamp`: (tick of the key, status, input), by tick.
async fn runs(pool: &PgPool) -> Vec<(String, String, Stamp)> {
    let rows: Vec<(String, String, sqlx::types::Json<Stamp>)> = sqlx::query_as(
        "SELECT idempotency_key, status, input FROM pgflow.runs
         WHERE workflow = 'sched_stamp' ORDER BY idempotency_key",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(k, s, i)| (k, s, i.0)).collect()
}

async fn wait_for_runs(pool: &PgPool, n: usize, succeeded: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = runs(pool).await;
        let done = r
            .iter()
            .filter(|(_, s, _)| !succeeded || s == "succeeded")
            .count();
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {done} of {n} runs: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key(name: &str, at: DateTime<Utc>) -> String {
    format!(
        "schedule:{name}:{}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// Sets schedule `name`'s next tick.
async fn set_next_tick(pool: &PgPool, name: &str, at: DateTime<Utc>) {
    sqlx::query("UPDATE pgflow.schedules SET next_tick = $2 WHERE name = $1")
        .bind(name)
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
}

async fn next_tick(pool: &PgPool, name: &str) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT next_tick FROM pgflow.schedules WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The top of the minute `minutes` before now (a tick of `0 * * * * *`).
async fn minute_mark(pool: &PgPool, minutes: i32) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT date_trunc('minute', now()) - make_interval(mins => $1)")
        .bind(minutes)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[test]
fn a_bad_schedule_is_an_error_not_a_panic() {
    let e = Schedule::cron::<Stamped>("s", "61 * * * *", stamp).unwrap_err();
    assert!(matches!(e, Error::InvalidSchedule { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("schedule `s`: invalid cron expression `61 * * * *`"),
        "{msg}"
    );
    let e = Schedule::cron::<Stamped>("s", "every day", stamp).unwrap_err();
    assert!(e.to_string().contains("expected 5 fields"), "{e}");
    let e = Schedule::cron::<Stamped>("s", "0 0 30 2 *", stamp).unwrap_err();
    assert!(e.to_string().contains("has no tick after now"), "{e}");
    let e = Schedule::cron::<Stamped>(" ", "* * * * *", stamp).unwrap_err();
    assert!(e.to_string().contains("non-empty name"), "{e}");
    let e = every_second("s").time_zone("Mars/Olympus").unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown time zone `Mars/Olympus`: expected an IANA name"),
        "{e}"
    );
    let s = every_second("s").time_zone("america/new_york");
    assert!(
        s.unwrap_err()
            .to_string()
            .contains("did you mean `America/New_York`")
    );
}

#[test]
fn a_schedule_says_what_it_is_and_what_its_ticks_give() {
    let s = Schedule::cron::<Stamped>("nightly", "0 0 3 * * *", stamp)
        .unwrap()
        .time_zone("Europe/Paris")
        .unwrap()
        .missed(Missed::RunEach);
    assert_eq!(
        (
            s.name(),
            s.workflow().name(),
            s.expression(),
            s.time_zone_name()
        ),
        ("nightly", "sched_stamp", "0 0 3 * * *", "Europe/Paris")
    );
    assert_eq!(s.missed_policy(), Missed::RunEach);
    let from: DateTime<Utc> = "2026-06-01T12:00:00Z".parse().unwrap();
    let next = s.upcoming(from).next().unwrap();
    assert_eq!(next.to_rfc3339(), "2026-06-02T01:00:00+00:00");
    let input = s.input_at(next).unwrap();
    assert_eq!(input["local"], "2026-06-02T03:00:00+02:00");
    assert_eq!(input["previous"], serde_json::Value::Null);
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn each_tick_starts_one_run_across_runtimes(pool: PgPool) {
    // Two runtimes register the schedule (one serves no queue: a producer fires
    // schedules too); a third one only runs the workflow.
    let a = runtime(&pool, false, vec![every_second("every_second")]).await;
    let b = runtime(&pool, true, vec![every_second("every_second")]).await;
    wait_for_runs(&pool, 4, true).await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();

    let r = runs(&pool).await;
    let ticks: Vec<DateTime<Utc>> = r.iter().map(|(_, _, s)| s.at).collect();
    for (i, (k, _, s)) in r.iter().enumerate() {
        assert_eq!(k, &key("every_second", s.at), "the key names the tick");
        assert_eq!(s.at.timestamp_subsec_nanos(), 0, "a whole second");
        assert_eq!(s.local, s.at.fixed_offset().to_rfc3339(), "UTC");
        if i > 0 {
            assert_eq!(
                (s.at - ticks[i - 1]).num_seconds(),
                1,
                "no tick missed, none twice: {ticks:?}"
            );
            assert_eq!(
                s.previous,
                Some(ticks[i - 1]),
                "previous is the last run's tick"
            );
        }
    }
    println!("{} ticks fired by two schedulers: {ticks:?}", ticks.len());
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn schedules_are_listed_and_removable(pool: PgPool) {
    let nightly = Schedule::cron::<Stamped>("nightly", "0 0 3 * * *", stamp)
        .unwrap()
        .time_zone("Europe/Paris")
        .unwrap()
        .missed(Missed::Skip)
        .grace(Duration::from_secs(5));
    let rt = runtime(&pool, true, vec![nightly, every_second("often")]).await;
    wait_for_runs(&pool, 1, true).await;

    let list = rt.schedules().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["nightly", "often"]
    );
    let n = &list[0];
    assert_eq!(
        (n.workflow.as_str(), n.cron.as_str(), n.time_zone.as_str()),
        ("sched_stamp", "0 0 3 * * *", "Europe/Paris")
    );
    assert_eq!((n.missed, n.grace_ms), (Missed::Skip, 5_000));
    let next = n.next_tick.expect("a next tick");
    assert!(next > Utc::now(), "{next}");
    assert!(n.next_in_ms.unwrap() > 0 && n.overdue().is_none());
    let utc_hour = chrono::Timelike::hour(&next);
    assert!([1, 2].contains(&utc_hour), "03:00 in Paris: {next}");
    assert_eq!((n.last_tick, n.last_run_id), (None, None));
    let o = &list[1];
    assert!(o.last_tick.is_some() && o.last_run_id.is_some());
    assert!(o.last_run_status.is_some());

    let status = admin::status(&pool).await.unwrap();
    assert_eq!(status.schedules.len(), 2);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["schedules"][0]["missed"], "skip");

    // Removed: no instance fires it any more; the other one goes on.
    assert!(rt.remove_schedule("often").await.unwrap());
    let fired = runs(&pool).await.len();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        runs(&pool).await.len(),
        fired,
        "a removed schedule fires nothing"
    );
    assert!(!rt.remove_schedule("often").await.unwrap());
    let e = admin::remove_schedule(&pool, "often").await.unwrap_err();
    assert!(
        matches!(&e, Error::UnknownSchedule { name, known } if name == "often" && known == "nightly"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "no schedule named `often`; schedules: nightly"
    );
    let gone = admin::remove_schedule(&pool, "nightly").await.unwrap();
    assert_eq!(gone.cron, "0 0 3 * * *");
    assert!(rt.schedules().await.unwrap().is_empty());
    rt.shutdown().await.unwrap();

    // An instance that registers it in code stores it again when it starts.
    let again = runtime(&pool, false, vec![every_second("often")]).await;
    let list = again.schedules().await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].next_tick.unwrap() > list[0].created_at);
    again.shutdown().await.unwrap();
}

/// Registers `schedule` (a runtime starts and stops), then moves its next tick to
/// the top of the minute `minutes` ago, as if every instance had been down since
/// then; returns that tick. The next runtime to start finds the missed ticks in its
/// scheduler's first pass.
async fn down_since(pool: &PgPool, schedule: Schedule, minutes: i32) -> DateTime<Utc> {
    let name = schedule.name().to_owned();
    let rt = runtime(pool, false, vec![schedule]).await;
    rt.shutdown().await.unwrap();
    let from = minute_mark(pool, minutes).await;
    set_next_tick(pool, &name, from).await;
    from
}

fn every_minute(missed: Missed) -> Schedule {
    Schedule::cron::<Stamped>("minutely", "0 * * * * *", stamp)
        .unwrap()
        .missed(missed)
}

/// Waits until the scheduler handled the due ticks of `name` (its next tick is
/// after now) and returns its next tick.
async fn settled(pool: &PgPool, name: &str) -> DateTime<Utc> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = db_now(pool).await;
        if let Some(t) = next_tick(pool, name).await.filter(|t| *t > now) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "the missed ticks were not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn run_each_fires_every_missed_tick(pool: PgPool) {
    let from = down_since(&pool, every_minute(Missed::RunEach), 5).await;
    let rt = runtime(&pool, true, vec![every_minute(Missed::RunEach)]).await;
    let next = settled(&pool, "minutely").await;
    let r = runs(&pool).await;
    // 5 minutes back: the ticks at -5, -4, .., -1 and 0 (and one more if a minute
    // began meanwhile); oldest first, each once, each seeing the one before.
    assert!(r.len() >= 6, "{r:?}");
    for (i, (k, _, s)) in r.iter().enumerate() {
        let expected = from + chrono::Duration::minutes(i as i64);
        assert_eq!(s.at, expected);
        assert_eq!(k, &key("minutely", expected));
        let previous = (i > 0).then(|| expected - chrono::Duration::minutes(1));
        assert_eq!(s.previous, previous);
    }
    assert_eq!(next, r.last().unwrap().2.at + chrono::Duration::minutes(1));
    wait_for_runs(&pool, r.len(), true).await;
    let list = rt.schedules().await.unwrap();
    assert_eq!(list[0].last_tick, Some(r.last().unwrap().2.at));
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn run_once_fires_the_latest_missed_tick(pool: PgPool) {
    let from = down_since(&pool, every_minute(Missed::RunOnce), 5).await;
    // It ran before the downtime: the run's `previous` says when.
    let before = from - chrono::Duration::minutes(1);
    sqlx::query("UPDATE pgflow.schedules SET last_tick = $1 WHERE name = 'minutely'")
        .bind(before)
        .execute(&pool)
        .await
        .unwrap();
    let rt = runtime(&pool, true, vec![every_minute(Missed::RunOnce)]).await;
    let next = settled(&pool, "minutely").await;
    let r = runs(&pool).await;
    assert_eq!(r.len(), 1, "{r:?}");
    let s = &r[0].2;
    assert_eq!(s.at, next - chrono::Duration::minutes(1), "the latest tick");
    assert!(s.at >= from + chrono::Duration::minutes(5));
    assert_eq!(
        s.previous,
        Some(before),
        "the tick of the run before the downtime"
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn skip_drops_ticks_later_than_the_grace(pool: PgPool) {
    let strict = || every_minute(Missed::Skip).grace(Duration::ZERO);
    down_since(&pool, strict(), 5).await;
    let rt = runtime(&pool, true, vec![strict()]).await;
    let next = settled(&pool, "minutely").await;
    assert!(
        runs(&pool).await.is_empty(),
        "every missed tick was skipped"
    );
    assert!(next > db_now(&pool).await);
    rt.shutdown().await.unwrap();

    // With the default grace (60 s) the latest tick, less than a minute late, fires.
    down_since(&pool, every_minute(Missed::Skip), 3).await;
    let rt = runtime(&pool, true, vec![every_minute(Missed::Skip)]).await;
    let next = settled(&pool, "minutely").await;
    let r = runs(&pool).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].2.at, next - chrono::Duration::minutes(1));
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_changed_expression_starts_over_a_changed_policy_keeps_due_ticks(pool: PgPool) {
    // Registered under run_once, down with ticks due, restarted under run_each:
    // the due ticks are kept and fired by the new policy.
    let from = down_since(&pool, every_minute(Missed::RunOnce), 2).await;
    let rt = runtime(&pool, false, vec![every_minute(Missed::RunEach)]).await;
    settled(&pool, "minutely").await;
    let r = runs(&pool).await;
    assert!(r.len() >= 3, "run_each now, from {from}: {r:?}");
    assert_eq!(r[0].2.at, from);
    rt.shutdown().await.unwrap();
    let fired = r.len();

    // Down again, restarted with another expression: the stored one is replaced
    // and its ticks start over from now (the due ones of the old one are dropped).
    set_next_tick(&pool, "minutely", from).await;
    let hourly = Schedule::cron::<Stamped>("minutely", "0 0 * * * *", stamp).unwrap();
    let rt = runtime(&pool, false, vec![hourly]).await;
    let next = next_tick(&pool, "minutely").await.unwrap();
    let now = db_now(&pool).await;
    assert!(
        next > now && next <= now + chrono::Duration::hours(1),
        "{next}"
    );
    assert_eq!(chrono::Timelike::minute(&next), 0);
    let list = rt.schedules().await.unwrap();
    assert_eq!(list[0].cron, "0 0 * * * *");
    assert!(list[0].updated_at > list[0].created_at);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs(&pool).await.len(), fired);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_panicking_input_function_loses_its_tick_only(pool: PgPool) {
    // The input function panics on even seconds (the panic messages on stderr are
    // expected): those ticks start no run, the others do.
    let odd_only = Schedule::cron::<Stamped>("odd", "* * * * * *", |tick: &Tick| {
        assert!(tick.at.timestamp() % 2 == 1, "no input for an even second");
        stamp(tick)
    })
    .unwrap();
    let rt = runtime(&pool, true, vec![odd_only]).await;
    wait_for_runs(&pool, 2, true).await;
    let r = runs(&pool).await;
    assert!(r.iter().all(|(_, _, s)| s.at.timestamp() % 2 == 1), "{r:?}");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn two_schedules_with_one_name_are_refused(pool: PgPool) {
    let e = Runtime::builder()
        .pool(pool.clone())
        .schedule(every_second("twice"))
        .schedule(every_second("twice"))
        .start()
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("schedule `twice`: registered twice on this builder"),
        "{e}"
    );
}
