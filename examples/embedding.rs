//! Split documents, embed every chunk in its own task (a `map` step), store the
//! vectors in PostgreSQL, and answer a nearest-neighbour query — with both embedding
//! models (feature hashing; see `pgflow_suite::embedding`).
//!
//! ```text
//! cargo run --example embedding -- [--extra-docs 40]
//! ```
//!
//! It checks its own results and ends with `embedding: OK` (exit 0) or what was
//! wrong (exit 1).

use std::time::Instant;

use pgflow_runtime::Runtime;
use pgflow_suite::embedding::{EmbedRequest, Embedding, EmbeddingModel, Hit, demo_corpus};

async fn run(extra: usize) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let url = pgflow_suite::support::database_url();
    let pool = sqlx::PgPool::connect(&url).await?;
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("embeddings", 16)
        .instance_id(format!("embedding-example-{}", std::process::id()))
        .data(pool.clone())
        .start()
        .await?;
    let docs = demo_corpus(extra);
    let mut problems = Vec::new();
    for model in [EmbeddingModel::HashBow256, EmbeddingModel::HashNgram1024] {
        let started = Instant::now();
        let run = rt
            .start::<Embedding>(EmbedRequest {
                collection: "pgflow-docs".into(),
                model,
                documents: docs.clone(),
                query: "how are failed steps retried with backoff".into(),
                top_k: 3,
            })
            .await?;
        let hits: Vec<Hit> = run.wait().await?;
        let (elements, instances): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT instance_id) FROM pgflow.step_elements WHERE run_id = $1",
        )
        .bind(run.id().0)
        .fetch_one(&pool)
        .await?;
        println!(
            "{}: {elements} chunks embedded as separate tasks in {:.0} ms; nearest to the query:",
            model.name(),
            started.elapsed().as_secs_f64() * 1e3
        );
        for h in &hits {
            println!("  {:.3}  {}#{}", h.score, h.doc_id, h.chunk_index);
        }
        if hits.first().map(|h| h.doc_id.as_str()) != Some("retries") {
            problems.push(format!(
                "{}: the nearest chunk is not from `retries`: {hits:?}",
                model.name()
            ));
        }
        let (stored, dims, norm): (i64, i32, f64) = sqlx::query_as(
            "SELECT count(*), max(dims),
                    avg((SELECT sqrt(sum(x * x)) FROM unnest(embedding) x))::float8
             FROM embedding_demo.chunks WHERE collection = 'pgflow-docs' AND model = $1",
        )
        .bind(model.name())
        .fetch_one(&pool)
        .await?;
        if stored != elements || dims as usize != model.dims() {
            problems.push(format!(
                "{}: stored {stored} vectors of {dims} dims for {elements} chunks",
                model.name()
            ));
        }
        let unit = (norm - 1.0).abs() < 1e-3;
        if unit != (model == EmbeddingModel::HashNgram1024) {
            problems.push(format!("{}: average norm {norm:.3}", model.name()));
        }
        if instances < 1 {
            problems.push(format!(
                "{}: no element recorded its instance",
                model.name()
            ));
        }
    }
    rt.shutdown().await?;
    Ok(problems)
}

#[tokio::main]
async fn main() {
    let mut extra = 40;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--extra-docs", Some(v)) => extra = v,
            _ => {
                eprintln!("usage: embedding [--extra-docs N]");
                std::process::exit(2);
            }
        }
    }
    match run(extra).await {
        Ok(p) if p.is_empty() => println!("embedding: OK"),
        Ok(p) => {
            for p in p {
                eprintln!("embedding: {p}");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("embedding failed: {e}");
            std::process::exit(1);
        }
    }
}
