//! Parsing and printing of sizes (`512MiB`, `32GiB`, plain bytes) and
//! durations (`90s`, `8h`, `1d`). Pure: no I/O.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error(
        "`{0}` is not a size: use bytes or a number with B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
    )]
    BadSize(String),
    #[error("`{0}` is not a duration: use a number with s, m, h or d")]
    BadDuration(String),
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Parses a size: a plain number of bytes, or a number (integer or decimal)
/// with a unit. Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024;
/// decimal ones (`KB`, `MB`, `GB`, `TB`) powers of 1000; `K`, `M`, `G`, `T`
/// alone are taken as binary, as Docker does. Case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(UnitError::Empty);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') || num.ends_with('.')
    {
        return Err(UnitError::BadSize(s.to_string()));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "ki" => 1 << 10,
        "m" | "mib" | "mi" => 1 << 20,
        "g" | "gib" | "gi" => 1 << 30,
        "t" | "tib" | "ti" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(UnitError::BadSize(s.to_string())),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int
        .parse()
        .map_err(|_| UnitError::Overflow(s.to_string()))?;
    let mut total = int
        .checked_mul(mult)
        .ok_or_else(|| UnitError::Overflow(s.to_string()))?;
    if !frac.is_empty() {
        if mult == 1 {
            return Err(UnitError::BadSize(s.to_string()));
        }
        // At most 9 fractional digits are meaningful for these units.
        let digits = &frac[..frac.len().min(9)];
        let f: u64 = digits
            .parse()
            .map_err(|_| UnitError::BadSize(s.to_string()))?;
        let scale = 10u64.pow(digits.len() as u32);
        let part = (f as u128 * mult as u128 / scale as u128) as u64;
        total = total
            .checked_add(part)
            .ok_or_else(|| UnitError::Overflow(s.to_string()))?;
    }
    Ok(total)
}

/// Prints a size with the largest binary unit that keeps it readable:
/// `32GiB`, `1.5GiB`, `512MiB`, `100B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, m) in UNITS {
        if bytes >= m {
            if bytes.is_multiple_of(m) {
                return format!("{}{name}", bytes / m);
            }
            let v = bytes as f64 / m as f64;
            return format!("{v:.1}{name}");
        }
    }
    format!("{bytes}B")
}

/// The longest duration [`parse_duration`] accepts (100 years): every
/// duration from outside stays far from the limits of date arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

/// Parses a duration: a number with `s`, `m`, `h` or `d` (`90s`, `8h`,
/// `1d`), or several of them (`1h30m`). A bare number is seconds. Longer
/// than [`MAX_DURATION`] is refused.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let d = parse_duration_unbounded(s)?;
    if d > MAX_DURATION {
        return Err(UnitError::Overflow(s.to_string()));
    }
    Ok(d)
}

fn parse_duration_unbounded(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(UnitError::Empty);
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(UnitError::BadDuration(s.to_string())),
        };
        if num.is_empty() {
            return Err(UnitError::BadDuration(s.to_string()));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| UnitError::Overflow(s.to_string()))?;
        total = n
            .checked_mul(mult)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| UnitError::Overflow(s.to_string()))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(UnitError::BadDuration(s.to_string()));
    }
    Ok(Duration::from_secs(total))
}

/// Prints a duration compactly: `1h30m`, `45s`, `2d`.
pub fn format_duration(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (name, m) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= m {
            out.push_str(&format!("{}{name}", s / m));
            s %= m;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        let check = |s: &str, want: Option<u64>| assert_eq!(parse_size(s).ok(), want, "{s}");
        check("0", Some(0));
        check("512", Some(512));
        check("512MiB", Some(512 << 20));
        check("32GiB", Some(32 << 30));
        check("32gib", Some(32 << 30));
        check("1.5GiB", Some(3 << 29));
        check("256GB", Some(256_000_000_000));
        check("4g", Some(4 << 30));
        check(" 10 MiB ", Some(10 << 20));
        check("", None);
        check("MiB", None);
        check("12XB", None);
        check("1.2.3GiB", None);
        check("-1", None);
        check("1.5", None);
        check("99999999999999999999", None);
        check("20000000TiB", None);
    }

    #[test]
    fn durations() {
        let check = |s: &str, want: Option<u64>| {
            assert_eq!(parse_duration(s).ok().map(|d| d.as_secs()), want, "{s}")
        };
        check("90", Some(90));
        check("90s", Some(90));
        check("8h", Some(8 * 3600));
        check("1h30m", Some(5400));
        check("1d", Some(86400));
        check("h", None);
        check("1x", None);
        check("1h30", None);
        check("", None);
        check("36500d", Some(36500 * 86400));
        check("36501d", None);
        check("99999999999h", None);
        check("18446744073709551615", None);
        check("18446744073709551616s", None);
        check("99999999999999999999d", None);
    }

    proptest! {
        #[test]
        fn size_round_trip(v in 0u64..(1u64 << 50)) {
            let printed = format_size(v);
            let back = parse_size(&printed).unwrap();
            // One decimal of the unit is kept: the error is under 5% of a unit.
            let diff = back.abs_diff(v);
            prop_assert!(diff as f64 <= v as f64 * 0.05 + 1.0, "{v} -> {printed} -> {back}");
        }

        #[test]
        fn exact_units_round_trip(n in 0u64..1024, unit in 0usize..4) {
            let v = n << (10 * unit);
            prop_assert_eq!(parse_size(&format_size(v)).unwrap(), v);
        }

        #[test]
        fn parsers_never_panic_and_stay_bounded(s in "\\PC{0,40}") {
            if let Ok(d) = parse_duration(&s) {
                prop_assert!(d <= MAX_DURATION);
            }
            let _ = parse_size(&s);
        }

        #[test]
        fn unit_shaped_input_never_panics(n in "[0-9]{0,30}(\\.[0-9]{0,30})?", u in "(|s|m|h|d|[kmgt]i?b?|b|x)", m in "[0-9]{0,25}[smhd]?") {
            let _ = parse_size(&format!("{n}{u}"));
            let _ = parse_duration(&format!("{n}{u}{m}"));
        }

        #[test]
        fn duration_round_trip(s in 0u64..10_000_000) {
            let d = Duration::from_secs(s);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
