//! The web dashboard: server-rendered pages over the pgflow tables (overview,
//! runs, a run with its step graph, queues, instances, workflows, schedules), with
//! live updates, as an [axum](https://docs.rs/axum) router to mount in your own
//! server or to serve on its own (`pgflow dashboard --listen 127.0.0.1:8080`).
//! Assets are embedded; nothing is fetched from elsewhere.
//!
//! **Safe by default.** [`Dashboard::serve`] refuses an address other than a
//! loopback one unless a [`token`](Dashboard::token) is set; with a token, every
//! request needs it (`Authorization: Bearer ..`, or once as `?token=..`, which sets
//! a cookie). Actions (cancel, retry, fork, signal) are POSTs carrying a per-router CSRF token and
//! refused from other origins; [`read_only`](Dashboard::read_only) removes them.
//! Everything from run data (inputs, outputs, errors, keys) is escaped: a run whose
//! input holds `<script>` shows it as text. Pages are sent with a strict
//! Content-Security-Policy (scripts and styles from the dashboard only).
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use pgflow_runtime::dashboard::Dashboard;
//!
//! // Mounted in an application's own axum server, under /pgflow:
//! let app: axum::Router = axum::Router::new()
//!     .nest("/pgflow", Dashboard::new(pool.clone()).base_path("/pgflow/").router());
//! # let _ = app;
//!
//! // Or on its own, read-only:
//! Dashboard::new(pool).read_only(true).serve("127.0.0.1:8080".parse()?).await?;
//! # Ok(()) }
//! ```

mod graph;
mod html;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;

use crate::Error;

/// A dashboard over the pgflow tables of `pool`'s database: build it, then take
/// its [`router`](Self::router) or [`serve`](Self::serve) it.
///
/// ```
/// # fn demo(pool: sqlx::PgPool) {
/// let router = pgflow_runtime::dashboard::Dashboard::new(pool)
///     .read_only(true)
///     .token("s3cret")
///     .router();
/// # let _: axum::Router = router;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Dashboard {
    pool: PgPool,
    read_only: bool,
    token: Option<String>,
    base: String,
}

/// The state every handler sees.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) read_only: bool,
    token: Option<String>,
    /// Where the dashboard is mounted, ending with `/`.
    pub(crate) base: String,
    /// The CSRF token of this router's forms (random, per router).
    pub(crate) csrf: String,
}

type Ctx = State<Arc<Shared>>;

/// The dashboard router over `pool`, read-write, without a token, at `/`: for a
/// server that only listens on localhost. See [`Dashboard`] for the options.
///
/// ```
/// # fn demo(pool: sqlx::PgPool) {
/// let app: axum::Router = pgflow_runtime::dashboard::router(pool);
/// # let _ = app;
/// # }
/// ```
pub fn router(pool: PgPool) -> Router {
    Dashboard::new(pool).router()
}

impl Dashboard {
    /// A dashboard over `pool`: read-write, no token, mounted at `/`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            read_only: false,
            token: None,
            base: "/".to_owned(),
        }
    }

    /// Without actions: no cancel, retry, fork or signal forms, and their POSTs are
    /// refused.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Every request must carry this token (`Authorization: Bearer <token>`, or the
    /// cookie set by visiting any page once with `?token=<token>`). An empty token
    /// is no token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// The path the router is mounted at (`/pgflow/` for `Router::nest("/pgflow",
    /// ..)`), for the links the pages write. Default `/`.
    pub fn base_path(mut self, base: &str) -> Self {
        let mut base = base.trim().to_owned();
        if !base.starts_with('/') {
            base.insert(0, '/');
        }
        if !base.ends_with('/') {
            base.push('/');
        }
        self.base = base;
        self
    }

    /// The axum router of the pages, their assets and their actions.
    pub fn router(self) -> Router {
        let csrf = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let shared = Arc::new(Shared {
            pool: self.pool,
            read_only: self.read_only,
            token: self.token,
            base: self.base,
            csrf,
        });
        Router::new()
            .route("/", get(pages::overview))
            .route("/runs", get(pages::runs))
            .route("/runs/{id}", get(pages::run))
            .route("/runs/{id}/cancel", post(pages::cancel))
            .route("/runs/{id}/retry", post(pages::retry))
            .route("/runs/{id}/fork", post(pages::fork))
            .route("/runs/{id}/signal", post(pages::signal))
            .route("/queues", get(pages::queues))
            .route("/instances", get(pages::instances))
            .route("/workflows", get(pages::workflows))
            .route("/workflows/{name}/{version}", get(pages::workflow))
            .route("/schedules", get(pages::schedules))
            .route("/metrics", get(metrics))
            .route("/assets/app.css", get(css))
            .route("/assets/app.js", get(js))
            .fallback(pages::not_found)
            .layer(middleware::from_fn_with_state(Arc::clone(&shared), guard))
            .with_state(shared)
    }

    /// Serves the dashboard on `addr` until the process ends (or the listener
    /// fails): [`bind`](Self::bind), then [`BoundDashboard::serve`].
    ///
    /// # Errors
    ///
    /// As [`bind`](Self::bind); then the server's error.
    pub async fn serve(self, addr: SocketAddr) -> Result<(), Error> {
        self.bind(addr).await?.serve().await
    }

    /// Listens on `addr` (port 0: any free port), not serving yet.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
    /// let bound = pgflow_runtime::dashboard::Dashboard::new(pool)
    ///     .bind("127.0.0.1:0".parse().expect("an address"))
    ///     .await?;
    /// println!("dashboard on http://{}/", bound.local_addr());
    /// bound.serve().await
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an address that is not a loopback one without a
    /// [`token`](Self::token) (the dashboard shows every run's input and output,
    /// and can cancel runs), or one it cannot listen on.
    pub async fn bind(self, addr: SocketAddr) -> Result<BoundDashboard, Error> {
        if !addr.ip().is_loopback() && self.token.is_none() {
            return Err(Error::Config(format!(
                "the dashboard listens on {addr}, which is not a loopback address: \
                 set a token (--token or PGFLOW_DASHBOARD_TOKEN), or listen on 127.0.0.1"
            )));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().unwrap_or(addr);
        Ok(BoundDashboard {
            listener,
            local,
            router: self.router(),
        })
    }
}

/// A dashboard listening, not serving yet (see [`Dashboard::bind`]).
#[derive(Debug)]
pub struct BoundDashboard {
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    router: Router,
}

impl BoundDashboard {
    /// The address it listens on (the port chosen, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until the process ends (or the listener fails).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the server stops with an error.
    pub async fn serve(self) -> Result<(), Error> {
        axum::serve(self.listener, self.router)
            .await
            .map_err(|e| Error::Config(format!("the dashboard server stopped: {e}")))
    }
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0_u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The token a request carries: the bearer header, the cookie, or `?token=`.
fn carried_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<(&'a str, bool)> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some((bearer.trim(), false));
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("pgflow_dashboard="));
    if let Some(c) = cookie {
        return Some((c, false));
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(|t| (t, true))
}

/// Every request: the token (when one is set), the origin of actions, and the
/// security headers of every response.
async fn guard(State(s): Ctx, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        match carried_token(req.headers(), req.uri().query()) {
            Some((given, from_query)) if same(given, token) => {
                if from_query {
                    // once: the token becomes a cookie, and leaves the address bar
                    let mut resp = (
                        StatusCode::SEE_OTHER,
                        [(header::LOCATION, req.uri().path().to_owned())],
                    )
                        .into_response();
                    let cookie = format!(
                        "pgflow_dashboard={token}; Path={}; HttpOnly; SameSite=Strict",
                        s.base
                    );
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        resp.headers_mut().insert(header::SET_COOKIE, v);
                    }
                    return secure(resp);
                }
            }
            _ => {
                return secure(
                    (
                        StatusCode::UNAUTHORIZED,
                        "pgflow dashboard: a token is required (Authorization: Bearer <token>, or ?token=<token> once)",
                    )
                        .into_response(),
                );
            }
        }
    }
    if req.method() == axum::http::Method::POST && !same_origin(req.headers()) {
        return secure(
            (
                StatusCode::FORBIDDEN,
                "pgflow dashboard: cross-origin action refused",
            )
                .into_response(),
        );
    }
    secure(next.run(req).await)
}

/// Whether a POST comes from the dashboard's own pages: `Sec-Fetch-Site` (sent by
/// browsers) is `same-origin` when present, and `Origin`, when present, names the
/// host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let get = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if let Some(site) = get(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match (get(header::ORIGIN), get(header::HOST)) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// Adds the security headers to `resp`.
fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// `GET /metrics`: the database-wide metrics (queues, instances, runs by status)
/// in the Prometheus text format (with the `metrics` feature; without it, 404).
async fn metrics(State(s): Ctx) -> Response {
    #[cfg(feature = "metrics")]
    {
        crate::metrics::exposition(crate::metrics::cluster_text(&s.pool).await)
    }
    #[cfg(not(feature = "metrics"))]
    {
        let _ = s;
        (StatusCode::NOT_FOUND, "built without the `metrics` feature").into_response()
    }
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/app.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("assets/app.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }

    #[test]
    fn actions_from_other_origins_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }
}
