//! Go duration syntax (`1s`, `500ms`, `1m30s`, `1.5h`, `-2s`), as Litestream's YAML and flags accept it.
//!
//! Hand-written rather than taken from `humantime`: humantime accepts a superset of Go's grammar (spaces,
//! `days`, `min`, `sec`), so a file hearth accepted could be refused by Litestream, and it lacks Go's
//! signs and the Greek-mu spelling `μs`. This parser follows `time.ParseDuration` exactly and keeps the sign,
//! so each caller decides whether a negative value is an error.

use std::time::Duration;

/// Why a duration string was refused. The text matches what a user can fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error(
        "invalid duration {0:?}: expected a number followed by a unit (ns, us, ms, s, m, h), e.g. \"1s\" or \"1m30s\""
    )]
    Syntax(String),
    #[error("missing unit in duration {0:?}: write e.g. \"{0}s\" (units: ns, us, ms, s, m, h)")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?} (units: ns, us, ms, s, m, h)")]
    UnknownUnit { input: String, unit: String },
    #[error("duration {0:?} is out of range (at most about 292 years)")]
    Overflow(String),
}

/// A parsed Go duration: its magnitude and whether it was negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration {
    pub negative: bool,
    pub magnitude: Duration,
}

impl GoDuration {
    /// The duration if it is not negative (`-0s` counts as zero).
    pub fn non_negative(self) -> Option<Duration> {
        if self.negative && !self.magnitude.is_zero() {
            None
        } else {
            Some(self.magnitude)
        }
    }
}

/// Go's largest duration: `math.MaxInt64` nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        // Go accepts the micro sign (U+00B5) and the Greek small letter mu (U+03BC).
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Parses a duration the way Go's `time.ParseDuration` does.
pub fn parse_go_duration(input: &str) -> Result<GoDuration, DurationError> {
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    // Go special-cases a bare "0" (no unit needed); "-0" and "+0" are accepted too.
    if s == "0" {
        return Ok(GoDuration {
            negative,
            magnitude: Duration::ZERO,
        });
    }
    if s.is_empty() {
        return Err(if input.is_empty() {
            DurationError::Empty
        } else {
            DurationError::Syntax(input.to_string())
        });
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        // The integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, rest) = s.split_at(int_len);
        s = rest;
        // The fraction, if any.
        let mut frac_digits = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_digits = &rest[..frac_len];
            s = &rest[frac_len..];
            if int_len == 0 && frac_len == 0 {
                return Err(DurationError::Syntax(input.to_string()));
            }
        } else if int_len == 0 {
            return Err(DurationError::Syntax(input.to_string()));
        }
        // The unit runs up to the next digit or '.'.
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(input.to_string()));
        }
        let Some(per_unit) = unit_nanos(unit) else {
            return Err(DurationError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            });
        };
        let overflow = || DurationError::Overflow(input.to_string());
        let mut whole: u128 = 0;
        for b in int_digits.bytes() {
            whole = whole
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(b - b'0')))
                .ok_or_else(overflow)?;
            if whole > MAX_NANOS {
                return Err(overflow());
            }
        }
        let mut value = whole.checked_mul(per_unit).ok_or_else(overflow)?;
        // Fractions beyond 18 digits are below a nanosecond for every unit; Go drops them too.
        let mut frac: u128 = 0;
        let mut scale: u128 = 1;
        for b in frac_digits.bytes().take(18) {
            frac = frac * 10 + u128::from(b - b'0');
            scale *= 10;
        }
        value += frac * per_unit / scale;
        total = total.checked_add(value).ok_or_else(overflow)?;
        if total > MAX_NANOS {
            return Err(overflow());
        }
    }
    let secs = (total / 1_000_000_000) as u64;
    let nanos = (total % 1_000_000_000) as u32;
    Ok(GoDuration {
        negative,
        magnitude: Duration::new(secs, nanos),
    })
}

/// Formats a duration the way Go's `Duration.String` does (`1h0m0s`, `1.5s`, `500ms`), for messages.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos, 1_000_000));
    }
    let secs = nanos / 1_000_000_000;
    let sub = nanos % 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let s_text = trim_fraction(s * 1_000_000_000 + sub, 1_000_000_000);
    if h > 0 {
        format!("{h}h{m}m{s_text}s")
    } else if m > 0 {
        format!("{m}m{s_text}s")
    } else {
        format!("{s_text}s")
    }
}

fn trim_fraction(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> (bool, u128) {
        let d = parse_go_duration(s).unwrap();
        (d.negative, d.magnitude.as_nanos())
    }

    #[test]
    fn accepts_go_forms() {
        let s = 1_000_000_000u128;
        let cases: &[(&str, bool, u128)] = &[
            ("0", false, 0),
            ("-0", true, 0),
            ("+0", false, 0),
            ("1s", false, s),
            ("500ms", false, 500_000_000),
            ("1m30s", false, 90 * s),
            ("24h", false, 24 * 3600 * s),
            ("1.5h", false, 5400 * s),
            (".5s", false, 500_000_000),
            ("1.s", false, s),
            ("-2s", true, 2 * s),
            ("+2s", false, 2 * s),
            ("1h1h", false, 7200 * s),
            ("10us", false, 10_000),
            ("10\u{b5}s", false, 10_000),
            ("10\u{3bc}s", false, 10_000),
            ("7ns", false, 7),
            ("1.000000001s", false, s + 1),
            ("0.0000000001s", false, 0),
            ("2h45m0.5s", false, (2 * 3600 + 45 * 60) * s + 500_000_000),
        ];
        for (input, neg, nanos) in cases {
            assert_eq!(ok(input), (*neg, *nanos), "{input}");
        }
    }

    #[test]
    fn refuses_what_go_refuses() {
        let cases: &[(&str, DurationError)] = &[
            ("", DurationError::Empty),
            ("-", DurationError::Syntax("-".into())),
            ("s", DurationError::Syntax("s".into())),
            (".s", DurationError::Syntax(".s".into())),
            ("1", DurationError::MissingUnit("1".into())),
            ("10", DurationError::MissingUnit("10".into())),
            ("1s5", DurationError::MissingUnit("1s5".into())),
            ("fast", DurationError::Syntax("fast".into())),
            (
                "1 s",
                DurationError::UnknownUnit {
                    input: "1 s".into(),
                    unit: " s".into(),
                },
            ),
            (
                "1d",
                DurationError::UnknownUnit {
                    input: "1d".into(),
                    unit: "d".into(),
                },
            ),
            (
                "1sec",
                DurationError::UnknownUnit {
                    input: "1sec".into(),
                    unit: "sec".into(),
                },
            ),
            ("3000000h", DurationError::Overflow("3000000h".into())),
            (
                "99999999999999999999ns",
                DurationError::Overflow("99999999999999999999ns".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_go_duration(input).unwrap_err(), *want, "{input}");
        }
    }

    #[test]
    fn largest_go_duration_fits() {
        assert_eq!(ok("2562047h47m16.854775807s"), (false, i64::MAX as u128));
        assert!(parse_go_duration("2562047h47m16.854775808s").is_err());
    }

    #[test]
    fn formats_like_go() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (7, "7ns"),
            (1_500, "1.5µs"),
            (500_000_000, "500ms"),
            (1_000_000_000, "1s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (1_500_000_000, "1.5s"),
        ];
        for (nanos, want) in cases {
            assert_eq!(format_go_duration(Duration::from_nanos(*nanos)), *want);
        }
    }
}
