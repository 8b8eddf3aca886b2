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
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        other => bail!("{q:?}: unsupported quantity suffix {other:?}"),
    };
    Ok((value * scale).ceil() as u64)
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
}
