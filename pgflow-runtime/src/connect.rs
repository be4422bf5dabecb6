//! Connecting: one plain connection first (its error says why — refused, unknown
//! host, authentication, unknown database, a role over its connection limit — and it
//! is bounded in time, where a pool would retry until its acquire timeout and report
//! only the timeout), then a pool sized to what the role and database allow.
//! Passwords never appear in what is shown: [`mask_password`] masks every form of
//! connection string.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tracing::warn;

use crate::Error;

/// How long a first connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool connection idle for this long is pinged before it is handed out.
pub(crate) const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Parses `url` and opens one connection to it within [`CONNECT_TIMEOUT`].
pub(crate) async fn probe(url: &str) -> Result<(PgConnectOptions, PgConnection), Error> {
    let connect_error = |source| Error::Connect {
        url: mask_password(url),
        source,
    };
    let opts: PgConnectOptions = url.parse().map_err(connect_error)?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
        .await
        .map_err(|_| {
            connect_error(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the server accepted no connection or did not answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )))
        })?
        .map_err(connect_error)?;
    Ok((opts, conn))
}

/// Connects a pool of up to `max` connections to `url`, after a probe. `others` is
/// how many more connections the caller opens outside the pool (one per claimer;
/// the listener holds one of the pool's): when the role or the database allows
/// fewer than `max + others`, the pool is made smaller (two at least) and a warning
/// says why.
pub(crate) async fn pool(url: &str, max: u32, others: u32) -> Result<PgPool, Error> {
    let (opts, mut probe) = probe(url).await?;
    let max = match crate::store::connection_budget(&mut probe).await {
        Ok(Some(budget)) if budget < i64::from(max + others) => {
            // Two at least: a runtime's LISTEN holds one pool connection for good.
            let sized = u32::try_from((budget - i64::from(others)).max(2)).unwrap_or(2);
            warn!(
                allowed = budget,
                pool = sized,
                wanted = max,
                "pgflow: the role or database allows only {budget} more connections; the pool \
                 gets {sized} (the runtime also opens {others} for its claimers). Raise the \
                 limit (ALTER ROLE .. CONNECTION LIMIT) for full concurrency"
            );
            sized
        }
        _ => max,
    };
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(CONNECT_TIMEOUT)
        // No ping before handing out a connection that was in use less than
        // `PING_IF_IDLE_FOR` ago: it was pinged when it came back (sqlx always does),
        // and a round trip per acquire is paid by every start and every flush (~0.2
        // ms here, where a start takes ~1 ms). One idle for longer is pinged (a
        // server restart ends connections that sit idle), and replaced if it broke.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(opts)
        .await
        .map_err(|source| Error::Connect {
            url: mask_password(url),
            source,
        })
}

/// Masks the password in a PostgreSQL connection string, in every form: the
/// user-info of a URL (`postgres://u:secret@h/db`), a `password` query parameter
/// (`?password=secret`), and a keyword/value string (`host=h password=secret`,
/// quoted or not). Anything it cannot read is masked from `password` on.
///
/// ```
/// use pgflow_runtime::mask_password;
/// assert_eq!(mask_password("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
/// assert_eq!(mask_password("postgres://app@db/x"), "postgres://app@db/x");
/// assert_eq!(
///     mask_password("postgresql://db/x?user=app&password=s3cret&sslmode=require"),
///     "postgresql://db/x?user=app&password=***&sslmode=require"
/// );
/// assert_eq!(
///     mask_password("host=db user=app password='s3 cret' dbname=x"),
///     "host=db user=app password=*** dbname=x"
/// );
/// ```
pub fn mask_password(conn: &str) -> String {
    let trimmed = conn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        return mask_url(conn);
    }
    mask_keywords(conn)
}

fn mask_url(conn: &str) -> String {
    let Ok(mut url) = url::Url::parse(conn) else {
        return mask_from_password(conn);
    };
    if url.password().is_some() && url.set_password(Some("***")).is_err() {
        return mask_from_password(conn);
    }
    if url.query_pairs().any(|(k, _)| is_password_key(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_password_key(&k) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `Url` escapes what it must; the mask itself stays readable.
    url.to_string().replace("%2A%2A%2A", "***")
}

fn is_password_key(k: &str) -> bool {
    k.eq_ignore_ascii_case("password")
}

/// `key=value` pairs separated by spaces; values may be single-quoted with `\'`
/// and `\\` escapes (libpq's rules).
fn mask_keywords(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    loop {
        let start = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        if rest.is_empty() {
            return out;
        }
        let Some(eq) = rest.find('=') else {
            out.push_str(rest);
            return out;
        };
        let key = rest[..eq].trim();
        let value_start = eq + 1 + (rest[eq + 1..].len() - rest[eq + 1..].trim_start().len());
        let value = &rest[value_start..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let mut end = None;
            for (i, c) in quoted.char_indices() {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '\'') => {
                        end = Some(i + 2);
                        break;
                    }
                    _ => {}
                }
            }
            match end {
                Some(e) => e,
                // An unterminated quote: nothing after it can be trusted.
                None => value.len(),
            }
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(&rest[..value_start]);
        if is_password_key(key) {
            out.push_str("***");
        } else {
            out.push_str(&value[..value_len]);
        }
        rest = &value[value_len..];
    }
}

/// The last resort for a string neither form reads: everything from `password` on
/// (and a URL's user-info) is masked.
fn mask_from_password(conn: &str) -> String {
    let lower = conn.to_ascii_lowercase();
    let mut s = match lower.find("password") {
        Some(i) => format!("{}***", &conn[..i + "password".len() + 1]),
        None => conn.to_owned(),
    };
    if let (Some(scheme), Some(at)) = (s.find("://"), s.rfind('@')) {
        if at > scheme + 3 {
            let userinfo = &s[scheme + 3..at];
            if let Some(colon) = userinfo.find(':') {
                s = format!("{}:***{}", &s[..scheme + 3 + colon], &s[at..]);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_is_masked() {
        for (given, shown) in [
            (
                "postgres://app:s3cret@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            ("postgres://app@db/x", "postgres://app@db/x"),
            ("postgres://db/x", "postgres://db/x"),
            (
                "postgres://app:p%40ss@db/x?password=other",
                "postgres://app:***@db/x?password=***",
            ),
            (
                "postgresql://db/x?user=app&password=s3cret",
                "postgresql://db/x?user=app&password=***",
            ),
            (
                "host=db password=s3cret user=app",
                "host=db password=*** user=app",
            ),
            ("host=db password = s3cret", "host=db password = ***"),
            (r"password='it\'s secret' host=db", "password=*** host=db"),
            ("host=db PASSWORD=s3cret", "host=db PASSWORD=***"),
            ("password='unterminated secret", "password=***"),
        ] {
            let masked = mask_password(given);
            assert_eq!(masked, shown, "{given}");
            assert!(
                !masked.contains("s3cret") && !masked.contains("secret"),
                "{masked}"
            );
        }
    }

    #[test]
    fn what_cannot_be_read_is_masked_from_password_on() {
        let masked = mask_password("postgres://app:s3cret@[::1/x?password=s3cret");
        assert!(!masked.contains("s3cret"), "{masked}");
    }
}
