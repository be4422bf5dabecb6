//! Fair claiming across run keys (`RuntimeBuilder::fair_queue`), against the real
//! Postgres: one tenant's backlog does not delay another tenant's run; more keys than
//! one claim serves are all served (the cursor goes round); runs without a key are
//! served too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow::{StepContext, StepError, workflow};
use pgflow_runtime::{Runtime, StartOptions};
use pgflow_suite::support::{producer, settle};
use sqlx::PgPool;

pub struct Job;

#[workflow(name = "fair_job", queue = "fair")]
impl Job {
    #[step]
    async fn work(ms: u64) -> Result<u64, StepError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
}

async fn runtime(pool: &PgPool) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .fair_queue("fair", 4)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap()
}

/// Starts `n` runs of `ms` each under `key` in one transaction (one statement per
/// 1,000), so they are all queued before any is claimed.
async fn backlog(rt: &Runtime, pool: &PgPool, key: Option<&str>, n: usize, ms: u64) {
    let mut tx = pool.begin().await.unwrap();
    for _ in 0..n {
        let opts = match key {
            Some(k) => StartOptions::default().key(k),
            None => StartOptions::default(),
        };
        rt.start_with::<Job>(&mut tx, ms, opts).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn pending(pool: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks WHERE key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_backlog_of_one_key_does_not_delay_another(pool: PgPool) {
    // A producer queues tenant A's backlog first, then the worker starts.
    let producer = producer(&pool).await;
    backlog(&producer, &pool, Some("tenant-a"), 2_000, 5).await;
    let rt = runtime(&pool).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let b = rt
        .start_with::<Job>(
            &mut pool.acquire().await.unwrap(),
            1,
            StartOptions::default().key("tenant-b"),
        )
        .await
        .unwrap();
    assert_eq!(settle::<u64>(&rt, b.id()).await.unwrap(), 1);
    let waited = started.elapsed();
    let left = pending(&pool, "tenant-a").await;
    // In arrival order, B would wait for all of A (2,000 × 5 ms over 4 slots, ~2.5 s).
    assert!(
        left >= 1_000,
        "tenant B's run finished after {waited:?}, when only {left} of A's 2,000 were left"
    );
    // a run without a key is served too (in arrival order: after A's older tasks)
    let plain = rt.start::<Job>(2).await.unwrap();
    assert_eq!(settle::<u64>(&rt, plain.id()).await.unwrap(), 2);
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn more_keys_than_a_claim_serves_are_all_served(pool: PgPool) {
    let producer = producer(&pool).await;
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for k in 0..150 {
        for _ in 0..2 {
            let opts = StartOptions::default().key(format!("key-{k:03}"));
            ids.push(rt_start(&producer, &mut tx, opts).await);
        }
    }
    tx.commit().await.unwrap();
    let rt = runtime(&pool).await;
    for id in ids {
        assert_eq!(settle::<u64>(&rt, id).await.unwrap(), 0);
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

async fn rt_start(
    rt: &Runtime,
    conn: &mut sqlx::PgConnection,
    opts: StartOptions,
) -> pgflow::RunId {
    rt.start_with::<Job>(conn, 0, opts).await.unwrap().id()
}

/// Per key, and across all keys: (running now, most seen at once).
#[derive(Default)]
pub struct Concurrency(Mutex<HashMap<String, (u32, u32)>>, Mutex<(u32, u32)>);

pub struct Limited;

#[workflow(name = "fair_limited", queue = "limited", key = Self::tenant)]
impl Limited {
    #[step]
    async fn call(input: (String, u64), ctx: &StepContext) -> Result<u64, StepError> {
        let seen = ctx.data::<Arc<Concurrency>>()?;
        if let (Ok(mut m), Ok(mut all)) = (seen.0.lock(), seen.1.lock()) {
            for e in [m.entry(input.0.clone()).or_default(), &mut *all] {
                e.0 += 1;
                e.1 = e.1.max(e.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(input.1)).await;
        if let (Ok(mut m), Ok(mut all)) = (seen.0.lock(), seen.1.lock()) {
            if let Some(e) = m.get_mut(&input.0) {
                e.0 -= 1;
            }
            all.0 -= 1;
        }
        Ok(input.1)
    }

    fn tenant(input: &(String, u64)) -> &str {
        &input.0
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_key_limit_holds_across_instances(pool: PgPool) {
    let seen = Arc::new(Concurrency::default());
    // two instances, 8 slots each, at most 2 running tasks per key between them
    let mut instances = Vec::new();
    for id in ["limited-1", "limited-2"] {
        let rt = Runtime::builder()
            .pool(pool.clone())
            .instance_id(id)
            .queue("limited", 8)
            .key_concurrency("limited", 2)
            .data(Arc::clone(&seen))
            .poll_interval(Duration::from_millis(20))
            .start()
            .await
            .unwrap();
        instances.push(rt);
    }
    let rt = &instances[0];
    let mut inputs: Vec<(String, u64)> = (0..30).map(|_| ("a".to_owned(), 30)).collect();
    inputs.extend((0..6).map(|_| ("b".to_owned(), 30)));
    let ids = rt.start_many::<Limited>(inputs).await.unwrap();
    let started = Instant::now();
    for id in ids {
        settle::<u64>(rt, id).await.unwrap();
    }
    let m = seen.0.lock().unwrap().clone();
    assert_eq!(m["a"].1, 2, "{m:?}");
    assert_eq!(m["b"].1, 2, "{m:?}");
    // 30 tasks of `a`, two at a time, 30 ms each: at least 15 rounds
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let running: Vec<(String, i32)> =
        sqlx::query_as("SELECT key, running FROM pgflow.key_slots ORDER BY key")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(running, [("a".to_owned(), 0), ("b".to_owned(), 0)]);
    let limit0 = Runtime::builder()
        .pool(pool.clone())
        .instance_id("limited-0")
        .queue("limited", 1)
        .key_concurrency("limited", 0)
        .start()
        .await;
    assert!(limit0.is_err());
    for rt in instances {
        rt.shutdown().await.unwrap();
    }
}

pub struct Typing;

#[workflow(name = "fair_typing", queue = "fair")]
impl Typing {
    #[step]
    async fn save(text: String) -> Result<String, StepError> {
        Ok(text)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn debounced_starts_make_one_run_on_the_last_input(pool: PgPool) {
    let rt = runtime(&pool).await;
    let window = Duration::from_millis(1_500);
    let mut handles = Vec::new();
    for text in ["h", "he", "hello"] {
        let opts = StartOptions::default().debounce("doc-1", window);
        let run = rt
            .start_with::<Typing>(&mut pool.acquire().await.unwrap(), text.to_owned(), opts)
            .await
            .unwrap();
        handles.push((run.id(), run.created()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = handles[0].0;
    assert_eq!(
        handles,
        [(id, true), (id, false), (id, false)],
        "one run, joined twice"
    );
    // a burst from many connections at once joins it too
    let mut burst = Vec::new();
    for k in 0..8 {
        let (rt, pool) = (rt.clone(), pool.clone());
        burst.push(tokio::spawn(async move {
            let opts = StartOptions::default().debounce("doc-1", window);
            let mut conn = pool.acquire().await.unwrap();
            rt.start_with::<Typing>(&mut conn, format!("burst {k}"), opts)
                .await
                .unwrap()
                .id()
        }));
    }
    for b in burst {
        assert_eq!(b.await.unwrap(), id);
    }
    let last = StartOptions::default().debounce("doc-1", window);
    rt.start_with::<Typing>(
        &mut pool.acquire().await.unwrap(),
        "hello world".to_owned(),
        last,
    )
    .await
    .unwrap();
    let started = Instant::now();
    assert_eq!(settle::<String>(&rt, id).await.unwrap(), "hello world");
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "it waited for the window"
    );
    let runs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE workflow = 'fair_typing'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(runs, 1);
    // once the run has started, a debounced start makes a new one
    let again = rt
        .start_with::<Typing>(
            &mut pool.acquire().await.unwrap(),
            "again".to_owned(),
            StartOptions::default().debounce("doc-1", Duration::from_millis(100)),
        )
        .await
        .unwrap();
    assert!(again.created() && again.id() != id);
    assert_eq!(settle::<String>(&rt, again.id()).await.unwrap(), "again");
    // with an idempotency key: refused
    let both = StartOptions::default()
        .debounce("doc-1", window)
        .idempotency_key("k");
    let err = rt
        .start_with::<Typing>(&mut pool.acquire().await.unwrap(), "x".to_owned(), both)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not both"), "{err}");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn starts_during_a_backlog_never_run_more_than_the_queue_concurrency(pool: PgPool) {
    // Runs started while the claimer works off a backlog are also claimed by the
    // queue's express claims; together they take at most the queue's slots.
    let producer = producer(&pool).await;
    let backlog = (0..300).map(|_| ("a".to_owned(), 2));
    let mut ids = producer.start_many::<Limited>(backlog).await.unwrap();
    let seen = Arc::new(Concurrency::default());
    let rt = Runtime::builder()
        .pool(pool.clone())
        .fair_queue("limited", 3)
        .data(Arc::clone(&seen))
        .start()
        .await
        .unwrap();
    for k in 0..40 {
        // local starts wake the queue's claimers while the claimer is in a claim
        let run = rt.start::<Limited>((format!("b{k:02}"), 1)).await.unwrap();
        ids.push(run.id());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in ids {
        assert!(settle::<u64>(&rt, id).await.unwrap() >= 1);
    }
    let most = seen.1.lock().unwrap().1;
    assert!(
        most <= 3,
        "{most} executions ran at once in a queue of 3 slots"
    );
    assert_eq!(most, 3, "the queue never used its 3 slots");
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}
