//! Kubernetes quantities (`400Mi`, `1.5G`, `1024`) as bytes, and back.

use anyhow::{bail, Result};

pub fn to_bytes(q: &str) -> Result<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{q:?} is not a quantity"))?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        other => bail!("{q:?}: unsupported quantity suffix {other:?}"),
    };
    Ok((value * scale).ceil() as u64)
}

/// Whether `q` is a Kubernetes quantity, by the API server's grammar: a signed decimal number
/// (`1`, `1.5`, `.5`, `2.`) then one suffix: binary (`Ki` .. `Ei`), decimal (`m`, `k`, `M` ..
/// `E`) or an exponent (`e3`, `E-2`). The API server does not check quantities inside a custom
/// resource, so the operator checks them before they reach a Job.
pub fn is_quantity(q: &str) -> bool {
    fn number(s: &str) -> Option<&str> {
        let s = s.strip_prefix(['+', '-']).unwrap_or(s);
        let int = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let rest = &s[int..];
        let (frac, rest) = match rest.strip_prefix('.') {
            Some(r) => {
                let n = r.len() - r.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                (n, &r[n..])
            }
            None => (0, rest),
        };
        (int + frac > 0).then_some(rest)
    }
    let Some(suffix) = number(q) else {
        return false;
    };
    match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        _ => suffix
            .strip_prefix(['e', 'E'])
            .and_then(number)
            .is_some_and(str::is_empty),
    }
}

/// Bytes as a quantity in whole MiB, rounded up.
pub fn mebibytes(bytes: u64) -> String {
    format!("{}Mi", bytes.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_plain() {
        assert_eq!(to_bytes("400Mi").unwrap(), 400 << 20);
        assert_eq!(to_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(to_bytes("1024").unwrap(), 1024);
        assert!(to_bytes("12Q").is_err());
        assert!(to_bytes("Mi").is_err());
        assert_eq!(mebibytes((1 << 20) + 1), "2Mi");
    }

    #[test]
    fn tells_quantities_by_the_api_servers_grammar() {
        for q in [
            "1", "500m", "2Gi", "1.5", ".5", "2.", "+3k", "-1", "1e3", "1E-2", "4Ei",
        ] {
            assert!(is_quantity(q), "{q}");
        }
        for q in [
            "", "lots", "Mi", "1.5.2", "2 Gi", "1e", "1ei", "1KiB", ".", "e3", "1Q",
        ] {
            assert!(!is_quantity(q), "{q}");
        }
    }
}
