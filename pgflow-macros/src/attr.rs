//! Parsing of `#[workflow(..)]` and `#[step(..)]` options into their models.
//!
//! Options are `key = value` pairs (and the bare flag `map`). Each key is parsed
//! with its own rules; an unknown key, a repeated key or a malformed value is
//! recorded in the [`Ctxt`] and parsing goes on with the next option, so every
//! mistake is reported at once.

use proc_macro2::TokenStream;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;

use syn::{Ident, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;

pub(crate) const WORKFLOW_KEYS: &[&str] = &[
    "name",
    "version",
    "queue",
    "max_attempts",
    "timeout",
    "backoff",
    "priority",
    "max_snoozes",
    "key",
];

pub(crate) const STEP_KEYS: &[&str] = &[
    "max_attempts",
    "timeout",
    "backoff",
    "priority",
    "depends_on",
    "when",
    "map",
    "delay",
    "max_snoozes",
    "signal",
    "signal_timeout",
    "estimate_cents",
    "estimate_tokens",
    "limits",
];

/// Options shared by both levels.
#[derive(Default, Clone)]
pub(crate) struct RetryOptions {
    pub(crate) max_attempts: Option<u32>,
    /// Milliseconds.
    pub(crate) timeout: Option<u64>,
    /// Milliseconds.
    pub(crate) backoff: Option<u64>,
    pub(crate) priority: Option<i16>,
    pub(crate) max_snoozes: Option<u32>,
}

#[derive(Default)]
pub(crate) struct WorkflowAttr {
    pub(crate) name: Option<LitStr>,
    pub(crate) version: Option<u32>,
    pub(crate) queue: Option<LitStr>,
    /// `key = Self::tenant`: the fn computing a run's key from its input.
    pub(crate) key: Option<syn::Path>,
    pub(crate) retry: RetryOptions,
}

#[derive(Default)]
pub(crate) struct StepAttr {
    /// `depends_on = [a, b]`; `None` when absent (the step depends on the previous one).
    pub(crate) depends_on: Option<Vec<Ident>>,
    /// `when = path::to::predicate`: the `when` key and the predicate's path.
    pub(crate) when: Option<(Ident, syn::Path)>,
    /// `map` (one task per element): the `map` key, for error spans.
    pub(crate) map: Option<Ident>,
    /// `delay = "10m"`, in milliseconds.
    pub(crate) delay: Option<u64>,
    /// `signal = approval`: the signal's name.
    pub(crate) signal: Option<Ident>,
    /// `signal_timeout = "72h"`: the key (for error spans) and milliseconds.
    pub(crate) signal_timeout: Option<(Ident, u64)>,
    /// `estimate_cents = 5`: reserved against the run's budget when the step starts.
    pub(crate) estimate_cents: Option<u64>,
    /// `estimate_tokens = 2000`: likewise, against a token budget.
    pub(crate) estimate_tokens: Option<u64>,
    /// `limits = ["openai", "tenant_daily"]`: the runtime's limits it counts against.
    pub(crate) limits: Option<Vec<LitStr>>,
    pub(crate) retry: RetryOptions,
}

/// Parses `#[workflow(..)]` arguments.
pub(crate) fn parse_workflow_attr(tokens: TokenStream, cx: &mut Ctxt) -> WorkflowAttr {
    let mut attr = WorkflowAttr::default();
    parse_options(tokens, cx, WORKFLOW_KEYS, |key, input, cx| {
        match key.to_string().as_str() {
            "name" => set(cx, &key, &mut attr.name, parse_name(input, "name")?),
            "version" => {
                let v = parse_int::<u32>(input, 1, "version")?;
                set(cx, &key, &mut attr.version, v);
            }
            "queue" => set(cx, &key, &mut attr.queue, parse_name(input, "queue")?),
            "key" => {
                input.parse::<Token![=]>()?;
                let path: syn::Path = input.parse().map_err(|e| {
                    syn::Error::new(
                        e.span(),
                        "`key` takes the path of a fn from a reference to the input to the run's key, e.g. `key = Self::tenant`",
                    )
                })?;
                set(cx, &key, &mut attr.key, path);
            }
            "delay" | "signal" | "signal_timeout" => {
                return Err(syn::Error::new(
                    key.span(),
                    format!("`{key}` is a step option: put it on the `#[step(..)]` that waits"),
                ));
            }
            "estimate_cents" | "estimate_tokens" | "limits" => {
                return Err(syn::Error::new(
                    key.span(),
                    format!("`{key}` is a step option: put it on the `#[step(..)]` that spends it"),
                ));
            }
            _ => return parse_retry_option(&key, input, cx, &mut attr.retry),
        }
        Ok(true)
    });
    attr
}

/// Parses `#[step(..)]` arguments.
pub(crate) fn parse_step_attr(tokens: TokenStream, cx: &mut Ctxt) -> StepAttr {
    let mut attr = StepAttr::default();
    parse_options(tokens, cx, STEP_KEYS, |key, input, cx| {
        match key.to_string().as_str() {
            "depends_on" => {
                input.parse::<Token![=]>()?;
                let content;
                syn::bracketed!(content in input);
                let names = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
                set(cx, &key, &mut attr.depends_on, names.into_iter().collect());
            }
            "when" => {
                input.parse::<Token![=]>()?;
                let path: syn::Path = input.parse().map_err(|e| {
                    syn::Error::new(
                        e.span(),
                        "`when` takes the path of a predicate fn, e.g. `when = Self::needs_review`",
                    )
                })?;
                set(cx, &key, &mut attr.when, (key.clone(), path));
            }
            "map" => {
                if input.peek(Token![=]) || input.peek(syn::token::Paren) {
                    return Err(syn::Error::new(
                        input.span(),
                        "`map` is a flag and takes no value: write `#[step(map)]`",
                    ));
                }
                set(cx, &key, &mut attr.map, key.clone());
            }
            "delay" => {
                let v = parse_duration(input, true)?;
                set(cx, &key, &mut attr.delay, v);
            }
            "signal" => {
                input.parse::<Token![=]>()?;
                let name: Ident = input.parse().map_err(|e| {
                    syn::Error::new(
                        e.span(),
                        "`signal` takes the signal's name, e.g. `signal = approval`",
                    )
                })?;
                set(cx, &key, &mut attr.signal, name);
            }
            "signal_timeout" => {
                let v = parse_duration(input, false)?;
                set(cx, &key, &mut attr.signal_timeout, (key.clone(), v));
            }
            "estimate_cents" => {
                let v = parse_int::<u64>(input, 0, "estimate_cents")?;
                set(cx, &key, &mut attr.estimate_cents, v);
            }
            "estimate_tokens" => {
                let v = parse_int::<u64>(input, 0, "estimate_tokens")?;
                set(cx, &key, &mut attr.estimate_tokens, v);
            }
            "limits" => {
                input.parse::<Token![=]>()?;
                let content;
                syn::bracketed!(content in input);
                let names = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)
                    .map_err(|e| {
                        syn::Error::new(
                            e.span(),
                            "`limits` takes the names of the runtime's limits, e.g. `limits = [\"openai\"]`",
                        )
                    })?;
                for name in &names {
                    if name.value().is_empty() {
                        return Err(syn::Error::new(name.span(), "a limit needs a name"));
                    }
                }
                set(cx, &key, &mut attr.limits, names.into_iter().collect());
            }
            _ => return parse_retry_option(&key, input, cx, &mut attr.retry),
        }
        Ok(true)
    });
    attr
}

/// Parses `max_attempts`, `timeout`, `backoff`, `priority`, `max_snoozes`; `Ok(false)`
/// for any other key.
fn parse_retry_option(
    key: &Ident,
    input: ParseStream<'_>,
    cx: &mut Ctxt,
    retry: &mut RetryOptions,
) -> syn::Result<bool> {
    match key.to_string().as_str() {
        "max_attempts" => {
            let v = parse_int::<u32>(input, 1, "max_attempts")?;
            set(cx, key, &mut retry.max_attempts, v);
        }
        "timeout" => {
            let v = parse_duration(input, false)?;
            set(cx, key, &mut retry.timeout, v);
        }
        "max_snoozes" => {
            let v = parse_int::<u32>(input, 0, "max_snoozes")?;
            set(cx, key, &mut retry.max_snoozes, v);
        }
        "backoff" => {
            let v = parse_duration(input, true)?;
            set(cx, key, &mut retry.backoff, v);
        }
        "priority" => {
            input.parse::<Token![=]>()?;
            let negative = input.parse::<Option<Token![-]>>()?.is_some();
            let lit: LitInt = input.parse()?;
            let digits: i32 = lit.base10_parse()?;
            let v = if negative { -digits } else { digits };
            let v = i16::try_from(v).map_err(|_| {
                syn::Error::new(
                    lit.span(),
                    "`priority` must fit in an i16 (-32768 to 32767)",
                )
            })?;
            set(cx, key, &mut retry.priority, v);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Drives the `key = value, ..` loop; `one` parses the value of a key and returns
/// `Ok(false)` for an unknown key. A failed option is recorded and skipped.
fn parse_options(
    tokens: TokenStream,
    cx: &mut Ctxt,
    keys: &[&str],
    mut one: impl FnMut(Ident, ParseStream<'_>, &mut Ctxt) -> syn::Result<bool>,
) {
    let parser = |input: ParseStream<'_>| -> syn::Result<()> {
        while !input.is_empty() {
            let key: Ident = match input.call(syn::ext::IdentExt::parse_any) {
                Ok(k) => k,
                Err(e) => {
                    cx.syn_error(syn::Error::new(
                        e.span(),
                        format!("expected an option, one of: {}", list(keys)),
                    ));
                    skip_to_comma(input);
                    let _ = input.parse::<Option<Token![,]>>();
                    continue;
                }
            };
            match one(key.clone(), input, cx) {
                Ok(true) => {}
                Ok(false) => {
                    cx.error_spanned_by(
                        &key,
                        format!("unknown option `{key}`, expected one of: {}", list(keys)),
                    );
                    skip_to_comma(input);
                }
                Err(e) => {
                    cx.syn_error(e);
                    skip_to_comma(input);
                }
            }
            if input.is_empty() {
                break;
            }
            if let Err(e) = input.parse::<Token![,]>() {
                cx.syn_error(syn::Error::new(e.span(), "expected `,` between options"));
                skip_to_comma(input);
                let _ = input.parse::<Option<Token![,]>>();
            }
        }
        Ok(())
    };
    if let Err(e) = parser.parse2(tokens) {
        cx.syn_error(e);
    }
}

fn skip_to_comma(input: ParseStream<'_>) {
    while !input.is_empty() && !input.peek(Token![,]) {
        let _ = input.parse::<proc_macro2::TokenTree>();
    }
}

fn set<T>(cx: &mut Ctxt, key: &Ident, slot: &mut Option<T>, value: T) {
    if slot.is_some() {
        cx.error_spanned_by(key, format!("duplicate option `{key}`"));
    } else {
        *slot = Some(value);
    }
}

fn list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_name(input: ParseStream<'_>, key: &str) -> syn::Result<LitStr> {
    input.parse::<Token![=]>()?;
    let lit: LitStr = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("`{key}` takes a string, e.g. `{key} = \"llm\"`"),
        )
    })?;
    let v = lit.value();
    if v.is_empty() || v.len() > 200 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{key}` must be 1 to 200 characters with no whitespace"),
        ));
    }
    Ok(lit)
}

fn parse_int<T>(input: ParseStream<'_>, min: T, key: &str) -> syn::Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    T::Err: std::fmt::Display,
{
    input.parse::<Token![=]>()?;
    if input.peek(Token![-]) {
        return Err(syn::Error::new(
            input.span(),
            format!("`{key}` must be at least {min}"),
        ));
    }
    let lit: LitInt = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("`{key}` takes an integer, e.g. `{key} = 3`"),
        )
    })?;
    let value: T = lit.base10_parse()?;
    if value < min {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{key}` must be at least {min}"),
        ));
    }
    Ok(value)
}

fn parse_duration(input: ParseStream<'_>, zero_ok: bool) -> syn::Result<u64> {
    input.parse::<Token![=]>()?;
    let lit: LitStr = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "a duration is a string such as \"30s\", \"500ms\" or \"1m30s\"",
        )
    })?;
    let ms = parse_duration_str(&lit.value()).map_err(|why| {
        syn::Error::new(
            lit.span(),
            format!(
                "malformed duration {:?}: {why}; write numbers with units (`ms`, `s`, `m`, `h`, `d`), e.g. \"30s\", \"500ms\", \"1m30s\"",
                lit.value()
            ),
        )
    })?;
    if ms == 0 && !zero_ok {
        return Err(syn::Error::new(
            lit.span(),
            "a timeout must be greater than zero",
        ));
    }
    Ok(ms)
}

/// Parses a duration (`"30s"`, `"500ms"`, `"1m30s"`, `"1h 30m"`) into milliseconds
/// with `humantime`, and says in a few words what is wrong otherwise.
pub(crate) fn parse_duration_str(s: &str) -> Result<u64, String> {
    use humantime::DurationError as E;
    let d = humantime::parse_duration(s).map_err(|e| match e {
        E::Empty => "it is empty".to_owned(),
        E::NumberExpected(at) => format!("expected a number at {:?}", &s[at.min(s.len())..]),
        E::InvalidCharacter(at) => {
            format!("unexpected character at {:?}", &s[at.min(s.len())..])
        }
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("the number {value} has no unit")
        }
        E::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
        E::NumberOverflow => "duration too large".to_owned(),
    })?;
    u64::try_from(d.as_millis()).map_err(|_| "duration too large".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_str("30s"), Ok(30_000));
        assert_eq!(parse_duration_str("500ms"), Ok(500));
        assert_eq!(parse_duration_str("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_str("2h"), Ok(7_200_000));
        assert!(parse_duration_str("30").unwrap_err().contains("no unit"));
        assert!(
            parse_duration_str("3 sekunden")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert_eq!(parse_duration_str("1h 30m"), Ok(5_400_000));
        assert!(parse_duration_str("").is_err());
        assert!(parse_duration_str("s").is_err());
        assert!(parse_duration_str("99999999999999999999h").is_err());
    }

    #[test]
    fn workflow_options_parse() {
        let mut cx = Ctxt::default();
        let a = parse_workflow_attr(
            quote!(
                name = "llm",
                version = 2,
                queue = "q",
                max_attempts = 5,
                timeout = "10s",
                backoff = "0ms",
                priority = -3
            ),
            &mut cx,
        );
        assert!(!cx.has_errors());
        assert_eq!(a.name.map(|n| n.value()).as_deref(), Some("llm"));
        assert_eq!(a.version, Some(2));
        assert_eq!(a.retry.max_attempts, Some(5));
        assert_eq!(a.retry.timeout, Some(10_000));
        assert_eq!(a.retry.backoff, Some(0));
        assert_eq!(a.retry.priority, Some(-3));
    }

    #[test]
    fn every_bad_option_is_reported() {
        let mut cx = Ctxt::default();
        parse_step_attr(
            quote!(
                retry = 3,
                timeout = "soon",
                max_attempts = 0,
                depends_on = [a],
                depends_on = [b]
            ),
            &mut cx,
        );
        let errors = cx.into_compile_errors().to_string();
        assert!(errors.contains("unknown option `retry`"), "{errors}");
        assert!(errors.contains("malformed duration"), "{errors}");
        assert!(errors.contains("at least 1"), "{errors}");
        assert!(errors.contains("duplicate option `depends_on`"), "{errors}");
    }

    #[test]
    fn when_and_map_parse() {
        let mut cx = Ctxt::default();
        let a = parse_step_attr(quote!(when = Self::needs_review, map), &mut cx);
        assert!(!cx.has_errors());
        let (key, path) = a.when.expect("when");
        assert_eq!(key.to_string(), "when");
        assert_eq!(quote!(#path).to_string(), "Self :: needs_review");
        assert!(a.map.is_some());

        let mut cx = Ctxt::default();
        parse_step_attr(quote!(map = true, when = 3), &mut cx);
        let errors = cx.into_compile_errors().to_string();
        assert!(errors.contains("`map` is a flag"), "{errors}");
        assert!(
            errors.contains("`when` takes the path of a predicate fn"),
            "{errors}"
        );
    }

    #[test]
    fn depends_on_lists_names() {
        let mut cx = Ctxt::default();
        let a = parse_step_attr(quote!(depends_on = [a, b,]), &mut cx);
        assert!(!cx.has_errors());
        let names: Vec<String> = a
            .depends_on
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
