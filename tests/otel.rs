//! OpenTelemetry trace context against the real Postgres, with an in-memory span
//! exporter: the span that starts a run is the parent of every step attempt's span
//! (the run's `traceparent` is stored with it, so any instance's steps join the
//! trace); a run started outside any span stores none; a damaged stored context is
//! ignored, not fatal.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use pgflow::{StepError, workflow};
use pgflow_runtime::Runtime;
use pgflow_suite::support::wait_finished;
use sqlx::PgPool;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

pub struct Traced;

#[workflow(name = "otel_traced", queue = "otel")]
impl Traced {
    #[step]
    async fn first(n: u32) -> Result<u32, StepError> {
        Ok(n + 1)
    }

    #[step]
    async fn second(first: u32) -> Result<u32, StepError> {
        Ok(first * 2)
    }
}

/// The process's subscriber: tracing into OpenTelemetry into memory (once).
fn exporter() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static CELL: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    CELL.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("pgflow-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("the only subscriber");
        (exporter, provider)
    })
}

/// The finished `pgflow.step` spans of run `run_id`.
fn step_spans(run_id: i64) -> Vec<SpanData> {
    let (exporter, provider) = exporter();
    let _ = provider.force_flush();
    exporter
        .get_finished_spans()
        .expect("spans")
        .into_iter()
        .filter(|s| s.name == "pgflow.step")
        .filter(|s| {
            s.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "run_id" && kv.value.as_str() == run_id.to_string())
        })
        .collect()
}

async fn stored_context(pool: &PgPool, run_id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT trace_context FROM pgflow.runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await
        .expect("the run")
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn the_code_that_starts_a_run_and_its_steps_are_one_trace(pool: PgPool) {
    exporter();
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("otel", 4)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .expect("runtime");
    // a web request starts a run
    let request = tracing::info_span!("http.request", path = "/orders");
    let request_cx = request.context();
    let request_sc = request_cx.span().span_context().clone();
    assert!(request_sc.is_valid());
    let run = async { rt.start::<Traced>(3).await.expect("start") }
        .instrument(request.clone())
        .await;
    drop(request);
    wait_finished(&pool, &[run.id()]).await;
    let stored = stored_context(&pool, run.id().0)
        .await
        .expect("a stored context");
    assert_eq!(
        stored,
        format!("00-{}-{}-01", request_sc.trace_id(), request_sc.span_id())
    );
    let steps = step_spans(run.id().0);
    assert_eq!(steps.len(), 2, "one span per step attempt");
    for s in &steps {
        assert_eq!(s.span_context.trace_id(), request_sc.trace_id());
        assert_eq!(s.parent_span_id, request_sc.span_id());
    }

    // started outside any span: nothing stored, the steps are traces of their own
    let plain = rt.start::<Traced>(4).await.expect("start");
    wait_finished(&pool, &[plain.id()]).await;
    assert_eq!(stored_context(&pool, plain.id().0).await, None);
    let steps = step_spans(plain.id().0);
    assert_eq!(steps.len(), 2);
    assert!(
        steps
            .iter()
            .all(|s| s.span_context.trace_id() != request_sc.trace_id())
    );
    rt.shutdown().await.expect("shutdown");

    // a damaged stored context (the column is anyone's to write): ignored
    let producer = pgflow_suite::support::producer(&pool).await;
    let damaged = async { producer.start::<Traced>(5).await.expect("start") }
        .instrument(tracing::info_span!("another request"))
        .await;
    sqlx::query("UPDATE pgflow.runs SET trace_context = '00-zz-\u{1}-01' WHERE id = $1")
        .bind(damaged.id().0)
        .execute(&pool)
        .await
        .expect("damage");
    let rt = Runtime::builder()
        .pool(pool.clone())
        .instance_id("second")
        .queue("otel", 4)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .expect("runtime");
    wait_finished(&pool, &[damaged.id()]).await;
    assert_eq!(step_spans(damaged.id().0).len(), 2);
    rt.shutdown().await.expect("shutdown");
    producer.shutdown().await.expect("shutdown");
}
