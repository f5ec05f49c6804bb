//! Durations written the way Kubernetes and Istio users write them: `720h`, `90s`, `1h30m`, `10d`.

use std::time::Duration;

/// Parses `<number><unit>` sequences; units `ms`, `s`, `m`, `h`, `d`. Fractions are allowed
/// (`1.5h`). Returns `None` for anything else, including an empty string and overflow.
pub fn parse(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * secs;
    }
    if !total.is_finite() || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// Formats a duration compactly (`720h`, `90s`, `1h30m`), the inverse of [`parse`] for whole
/// seconds.
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_operators_write() {
        assert_eq!(parse("720h"), Some(Duration::from_secs(720 * 3600)));
        assert_eq!(parse("87600h"), Some(Duration::from_secs(87600 * 3600)));
        assert_eq!(parse("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("10d"), Some(Duration::from_secs(864000)));
        assert_eq!(parse("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "h", "10", "10x", "-5s", "1e9999h", "abc"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn format_and_parse_round_trip(secs in 1u64..10_000_000) {
            let d = Duration::from_secs(secs);
            prop_assert_eq!(parse(&format(d)), Some(d));
        }
    }
}
