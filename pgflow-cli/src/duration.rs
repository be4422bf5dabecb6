//! Durations on the command line (`--since 1h30m`).

use std::fmt;
use std::time::Duration;

/// A duration that did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidDuration(String);

impl fmt::Display for InvalidDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: expected a number and a unit, like 30s, 15m, 1h, 7d or 1h30m",
            self.0
        )
    }
}

impl std::error::Error for InvalidDuration {}

/// Parses a duration such as `30s`, `15m`, `1h`, `7d`, `2w` or `1h30m` (a unit is
/// required), with `humantime`.
pub(crate) fn parse_duration(input: &str) -> Result<Duration, InvalidDuration> {
    humantime::parse_duration(input.trim()).map_err(|_| InvalidDuration(input.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(129_600)
        );
        for bad in [
            "",
            "10",
            "h",
            "1x",
            "1h30",
            "-1h",
            "soon",
            "99999999999999999999w",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
