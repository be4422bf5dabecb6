//! The embedding workflow: split documents into overlapping chunks, embed every chunk
//! with a `map` step (one task per chunk, in parallel across workers), store the
//! vectors in PostgreSQL, and answer a nearest-neighbour query over them.
//!
//! Embeddings are computed locally by **feature hashing** (the "hashing trick",
//! Weinberger et al. 2009): each token is hashed (FNV-1a, 64 bit) to one of `dims`
//! buckets with a sign taken from another bit of the hash, so collisions cancel out
//! on average. Two models differ in dimension, features and normalisation:
//!
//! | model | dims | features | weighting | normalisation |
//! | --- | --- | --- | --- | --- |
//! | `hash-bow-256` | 256 | words | term count | none |
//! | `hash-ngram-1024` | 1024 | words and character trigrams | `1 + ln(count)` | L2 (unit length) |
//!
//! Vectors are stored in `embedding_demo.chunks` (created on first use) as `real[]`;
//! the query step ranks a collection's chunks by cosine similarity.

use std::collections::HashMap;

use pgflow::{StepContext, StepError, workflow};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Which embedding to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmbeddingModel {
    /// 256 dimensions, word counts, not normalised.
    HashBow256,
    /// 1024 dimensions, words and character trigrams, log counts, unit length.
    HashNgram1024,
}

impl EmbeddingModel {
    /// The name stored with each vector.
    pub fn name(self) -> &'static str {
        match self {
            Self::HashBow256 => "hash-bow-256",
            Self::HashNgram1024 => "hash-ngram-1024",
        }
    }

    /// The vector's length.
    pub fn dims(self) -> usize {
        match self {
            Self::HashBow256 => 256,
            Self::HashNgram1024 => 1024,
        }
    }

    /// Embeds `text`.
    ///
    /// ```
    /// use pgflow_suite::embedding::{cosine, EmbeddingModel};
    /// let m = EmbeddingModel::HashNgram1024;
    /// let a = m.embed("PostgreSQL stores the queue");
    /// assert_eq!(a.len(), 1024);
    /// assert!((a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    /// assert!(cosine(&a, &m.embed("the queue lives in PostgreSQL")) > cosine(&a, &m.embed("bananas are yellow")));
    /// ```
    pub fn embed(self, text: &str) -> Vec<f32> {
        let mut counts: HashMap<String, f32> = HashMap::new();
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        for w in &words {
            *counts.entry(format!("w:{w}")).or_default() += 1.0;
            if self == Self::HashNgram1024 {
                let padded: Vec<char> = format!("#{w}#").chars().collect();
                for g in padded.windows(3) {
                    *counts
                        .entry(format!("c:{}", g.iter().collect::<String>()))
                        .or_default() += 1.0;
                }
            }
        }
        let mut v = vec![0.0_f32; self.dims()];
        for (feature, count) in counts {
            let h = fnv1a(feature.as_bytes());
            let bucket = (h % self.dims() as u64) as usize;
            let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
            let weight = match self {
                Self::HashBow256 => count,
                Self::HashNgram1024 => 1.0 + count.ln(),
            };
            v[bucket] += sign * weight;
        }
        if self == Self::HashNgram1024 {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
        v
    }
}

/// FNV-1a, 64 bit.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// A document to index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Its id in the collection.
    pub id: String,
    /// Its text.
    pub text: String,
}

/// What to index and what to ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedRequest {
    /// The collection the chunks are stored under.
    pub collection: String,
    /// The embedding model.
    pub model: EmbeddingModel,
    /// The documents.
    pub documents: Vec<Document>,
    /// The nearest-neighbour query answered at the end.
    pub query: String,
    /// How many hits to return.
    pub top_k: usize,
}

/// One chunk of a document (the element of the map step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The document.
    pub doc_id: String,
    /// The chunk's position in the document.
    pub index: i32,
    /// Its words.
    pub text: String,
    /// The model to embed it with.
    pub model: EmbeddingModel,
}

/// A chunk and its vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedded {
    /// The chunk.
    pub chunk: Chunk,
    /// Its embedding.
    pub vector: Vec<f32>,
}

/// A nearest neighbour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// The document.
    pub doc_id: String,
    /// The chunk.
    pub chunk_index: i32,
    /// Cosine similarity to the query.
    pub score: f32,
    /// The chunk's text.
    pub text: String,
}

/// Words per chunk and the overlap between consecutive chunks.
pub const CHUNK_WORDS: usize = 40;
/// See [`CHUNK_WORDS`].
pub const CHUNK_OVERLAP: usize = 10;

const DDL: &str = "
CREATE SCHEMA IF NOT EXISTS embedding_demo;
CREATE TABLE IF NOT EXISTS embedding_demo.chunks (
    collection  text    NOT NULL,
    model       text    NOT NULL,
    doc_id      text    NOT NULL,
    chunk_index integer NOT NULL,
    dims        integer NOT NULL,
    text        text    NOT NULL,
    embedding   real[]  NOT NULL,
    PRIMARY KEY (collection, model, doc_id, chunk_index)
)";

/// Splits, embeds (one task per chunk), stores, answers a query.
pub struct Embedding;

#[workflow(
    name = "embedding",
    queue = "embeddings",
    max_attempts = 3,
    backoff = "100ms"
)]
impl Embedding {
    #[step]
    async fn split(req: EmbedRequest) -> Result<Vec<Chunk>, StepError> {
        if req.documents.is_empty() {
            return Err(StepError::permanent("nothing to index: no documents"));
        }
        let mut chunks = Vec::new();
        for doc in &req.documents {
            let words: Vec<&str> = doc.text.split_whitespace().collect();
            let mut start = 0;
            let mut index = 0;
            while start < words.len() {
                let end = (start + CHUNK_WORDS).min(words.len());
                chunks.push(Chunk {
                    doc_id: doc.id.clone(),
                    index,
                    text: words[start..end].join(" "),
                    model: req.model,
                });
                index += 1;
                if end == words.len() {
                    break;
                }
                start = end - CHUNK_OVERLAP;
            }
        }
        Ok(chunks)
    }

    #[step(map)]
    async fn embed(chunk: Chunk) -> Result<Embedded, StepError> {
        let vector = chunk.model.embed(&chunk.text);
        Ok(Embedded { chunk, vector })
    }

    #[step]
    async fn store(
        embedded: Vec<Embedded>,
        input: EmbedRequest,
        ctx: &StepContext,
    ) -> Result<usize, StepError> {
        let pool = ctx.data::<PgPool>()?;
        sqlx::raw_sql(DDL).execute(pool).await?;
        let mut tx = pool.begin().await?;
        for e in &embedded {
            // Idempotent: a retried step rewrites the same rows.
            sqlx::query(
                "INSERT INTO embedding_demo.chunks
                     (collection, model, doc_id, chunk_index, dims, text, embedding)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (collection, model, doc_id, chunk_index)
                 DO UPDATE SET dims = EXCLUDED.dims, text = EXCLUDED.text, embedding = EXCLUDED.embedding",
            )
            .bind(&input.collection)
            .bind(e.chunk.model.name())
            .bind(&e.chunk.doc_id)
            .bind(e.chunk.index)
            .bind(i32::try_from(e.vector.len()).unwrap_or(i32::MAX))
            .bind(&e.chunk.text)
            .bind(&e.vector)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(embedded.len())
    }

    #[step]
    async fn nearest(
        stored: usize,
        input: EmbedRequest,
        ctx: &StepContext,
    ) -> Result<Vec<Hit>, StepError> {
        if stored == 0 {
            return Ok(Vec::new());
        }
        let pool = ctx.data::<PgPool>()?;
        let rows: Vec<(String, i32, String, Vec<f32>)> = sqlx::query_as(
            "SELECT doc_id, chunk_index, text, embedding FROM embedding_demo.chunks
             WHERE collection = $1 AND model = $2",
        )
        .bind(&input.collection)
        .bind(input.model.name())
        .fetch_all(pool)
        .await?;
        let q = input.model.embed(&input.query);
        let mut hits: Vec<Hit> = rows
            .into_iter()
            .map(|(doc_id, chunk_index, text, v)| Hit {
                score: cosine(&q, &v),
                doc_id,
                chunk_index,
                text,
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(input.top_k);
        Ok(hits)
    }
}

/// A small corpus for the examples: four documents (one about retries, which the
/// examples' query should find first) and `extra` longer filler documents.
pub fn demo_corpus(extra: usize) -> Vec<Document> {
    let mut docs = vec![
        Document {
            id: "retries".into(),
            text: "When a step fails with a retryable error pgflow retries the failed step \
                   with exponential backoff and jitter until its attempts are exhausted; a \
                   permanent error fails the run at once and the error history is kept."
                .into(),
        },
        Document {
            id: "queue".into(),
            text: "Workers claim tasks from one PostgreSQL table with FOR UPDATE SKIP LOCKED \
                   over a partial index, in batches, and flush completions in batches."
                .into(),
        },
        Document {
            id: "instances".into(),
            text: "Every runtime instance heartbeats into the instances table; an instance \
                   that stops heartbeating is marked offline and its claimed tasks return \
                   to the queue."
                .into(),
        },
        Document {
            id: "bread".into(),
            text: "Knead the dough for ten minutes, let it rise in a warm place until doubled, \
                   shape the loaf and bake it in a hot oven until the crust is golden."
                .into(),
        },
    ];
    for i in 0..extra {
        docs.push(Document {
            id: format!("filler-{i}"),
            text: format!(
                "Filler document {i} about astronomy: the telescope observed planet {} and \
                 recorded its orbit, brightness and {} moons over several clear nights of \
                 careful observation, long exposures and patient calibration of the camera. \
                 The next season the survey repeated every measurement with a wider field, \
                 a colder sensor and a longer baseline, and the catalogue grew by {} entries.",
                i % 8,
                i % 5,
                10 + i
            ),
        });
    }
    docs
}
