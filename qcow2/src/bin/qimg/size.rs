//! Sizes as qemu prints and parses them.

/// qemu's `size_to_str`: "392 KiB", "6 MiB", "1.5 GiB" (three significant digits, binary units).
pub fn size_to_str(val: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // Switch to the next unit once the value reaches 1000 of the current one, as qemu does.
    let mut i = 0usize;
    while i + 1 < UNITS.len() && (val as f64) >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let v = val as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}", g3(v), UNITS[i])
}

/// printf's "%0.3g" for 0 <= v < 1000.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = if v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else if v >= 0.9995 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Parses a qemu size argument: bytes, or a number with a k/K/M/G/T/P/E suffix (binary units), or "b".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ('{s}')")
    };
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(bad()),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if num.is_empty() || num.len() > 40 {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if !(f.is_finite() && f >= 0.0) {
        return Err(bad());
    }
    let v = f * mult as f64;
    if v >= 9.2e18 {
        return Err(bad());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(401408), "392 KiB");
        assert_eq!(size_to_str(6 << 20), "6 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(1 << 40), "1 TiB");
        assert_eq!(size_to_str(1000 << 10), "0.977 MiB");
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999E").is_err());
    }
}
