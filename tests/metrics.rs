//! Prometheus metrics against the real Postgres: a runtime's counters and
//! histograms after known work (every figure exact), its queue gauges, and the
//! dashboard's database-wide endpoint, scraped over HTTP and parsed.

use std::collections::HashMap;
use std::time::Duration;

use pgflow::{StepContext, StepError, workflow};
use pgflow_runtime::Runtime;
use pgflow_suite::support::{serve, wait_finished};
use sqlx::PgPool;

pub struct Measured;

#[workflow(name = "m_chain", queue = "m")]
impl Measured {
    #[step]
    async fn first(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    /// Fails its first attempt, succeeds on the second.
    #[step(max_attempts = 3, backoff = "5ms")]
    async fn flaky(first: u32, ctx: &StepContext) -> Result<u32, StepError> {
        if ctx.attempt() == 1 {
            return Err(StepError::retryable("not yet"));
        }
        Ok(first + 1)
    }
}

pub struct Doomed;

#[workflow(name = "m_doomed", queue = "m")]
impl Doomed {
    #[step(max_attempts = 2, backoff = "5ms")]
    async fn only(_n: u32) -> Result<u32, StepError> {
        Err(StepError::retryable("always"))
    }
}

/// A step named as one of `m_chain`'s: its metrics are its own.
pub struct Twin;

#[workflow(name = "m_twin", queue = "m")]
impl Twin {
    #[step]
    async fn first(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

/// On a queue nobody here serves: stays due.
pub struct Waiting;

#[workflow(name = "m_waiting", queue = "m_nobody")]
impl Waiting {
    #[step]
    async fn only(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

/// The samples of a text exposition: `name{labels}` -> value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

async fn get(url: &str) -> (u16, String, String) {
    let r = reqwest::get(url).await.expect("scrape");
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, ct, r.text().await.expect("body"))
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn counters_histograms_and_gauges_match_the_work_done(pool: PgPool) {
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("m", 4)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .expect("runtime");
    let mut ids = rt.start_many::<Measured>(0..5).await.expect("start");
    ids.push(rt.start::<Doomed>(1).await.expect("start").id());
    ids.extend(rt.start_many::<Twin>(0..3).await.expect("start"));
    rt.start::<Waiting>(1).await.expect("start");
    rt.start::<Waiting>(2).await.expect("start");
    wait_finished(&pool, &ids).await;
    let base = serve(pgflow_runtime::metrics::router(rt.clone())).await;
    let (status, content_type, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(content_type.contains("openmetrics-text"), "{content_type}");
    assert!(
        text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1,
        "{text}"
    );
    let m = parse(&text);
    let at = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in\n{text}"))
    };
    let chain = |step: &str, outcome: &str| {
        at(&format!(
            "pgflow_step_attempts_total{{workflow=\"m_chain\",step=\"{step}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(chain("first", "succeeded"), 5.0);
    assert_eq!(chain("flaky", "retried"), 5.0);
    assert_eq!(chain("flaky", "succeeded"), 5.0);
    assert_eq!(
        at("pgflow_step_attempts_total{workflow=\"m_doomed\",step=\"only\",outcome=\"retried\"}"),
        1.0
    );
    assert_eq!(
        at("pgflow_step_attempts_total{workflow=\"m_doomed\",step=\"only\",outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        at("pgflow_tasks_claimed_total{workflow=\"m_chain\",step=\"first\"}"),
        5.0
    );
    assert_eq!(
        at("pgflow_tasks_claimed_total{workflow=\"m_twin\",step=\"first\"}"),
        3.0
    );
    assert_eq!(
        at("pgflow_step_attempts_total{workflow=\"m_twin\",step=\"first\",outcome=\"succeeded\"}"),
        3.0
    );
    assert_eq!(
        at("pgflow_tasks_claimed_total{workflow=\"m_chain\",step=\"flaky\"}"),
        10.0
    );
    assert_eq!(
        at("pgflow_step_duration_seconds_count{workflow=\"m_chain\",step=\"flaky\"}"),
        10.0
    );
    assert_eq!(
        at("pgflow_task_wait_seconds_count{workflow=\"m_chain\",step=\"first\"}"),
        5.0
    );
    // every completion was flushed: 5 + 10 + 2 + 3 of them
    assert_eq!(at("pgflow_flush_size_sum"), 20.0);
    assert!(at("pgflow_flush_duration_seconds_count") >= 1.0);
    assert_eq!(at("pgflow_instance_capacity"), 4.0);
    assert_eq!(at("pgflow_queue_due{queue=\"m_nobody\"}"), 2.0);
    assert!(at("pgflow_queue_oldest_due_seconds{queue=\"m_nobody\"}") >= 0.0);
    assert!(
        !m.keys()
            .any(|k| k.starts_with("pgflow_completions_rejected_total{")),
        "{text}"
    );

    // the dashboard's endpoint: the database's view, without this instance's counters
    let dash = serve(pgflow_runtime::dashboard::router(pool.clone())).await;
    let (status, _, text) = get(&format!("{dash}/metrics")).await;
    assert_eq!(status, 200);
    let m = parse(&text);
    let at = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in\n{text}"))
    };
    assert_eq!(
        at("pgflow_runs{workflow=\"m_chain\",status=\"succeeded\"}"),
        5.0
    );
    assert_eq!(
        at("pgflow_runs{workflow=\"m_doomed\",status=\"failed\"}"),
        1.0
    );
    assert_eq!(
        at("pgflow_runs{workflow=\"m_waiting\",status=\"running\"}"),
        2.0
    );
    assert_eq!(at("pgflow_queue_due{queue=\"m_nobody\"}"), 2.0);
    let capacity = format!(
        "pgflow_instances_capacity{{instance=\"{}\"}}",
        rt.instance_id()
    );
    assert_eq!(at(&capacity), 4.0);
    assert!(!text.contains("pgflow_step_attempts_total"), "{text}");
    rt.shutdown().await.expect("shutdown");
}
