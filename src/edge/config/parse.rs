//! Sizes (parsing and showing them) and the serde deserializers that parse
//! a value and run its single-value check.
//!
//! # Sizes
//!
//! A size is a plain integer (bytes) or a string: digits, optional spaces,
//! then a suffix. Suffixes are binary and case-insensitive: `B`, `K`/`KiB`,
//! `M`/`MiB`, `G`/`GiB`, `T`/`TiB`. Decimal-looking suffixes (`KB`, `MB`,
//! `GB`, `TB`) are refused because half of all readers take them as powers
//! of ten: an ambiguous size is rejected rather than guessed. Negative,
//! fractional and overflowing sizes are errors.
//!

use super::check::*;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

// ---------------------------------------------------------------------------
// Sizes.

/// Parses a size string: digits, optional spaces, optional binary suffix
/// (see the module docs). The error says what is wrong and what to write.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, rest) = t.split_at(digits_end);
    let suffix = rest.trim_start();
    let example = "write bytes or a number with B, KiB, MiB or GiB, e.g. 128KiB";
    if t.starts_with('-') {
        return Err(format!("{s:?} is negative; {example}"));
    }
    if digits.is_empty() {
        return Err(format!("{s:?} is not a size; {example}"));
    }
    if suffix.starts_with(['.', ',']) {
        return Err(format!(
            "{s:?} is fractional; sizes are whole numbers, {example}"
        ));
    }
    let mult = suffix_multiplier(suffix).ok_or_else(|| {
        if matches!(
            suffix.to_ascii_lowercase().as_str(),
            "kb" | "mb" | "gb" | "tb"
        ) {
            format!(
                "{s:?} is ambiguous (decimal or binary?); write {}{}iB for a binary size, or give bytes",
                digits,
                &suffix[..1].to_ascii_uppercase()
            )
        } else {
            format!("{s:?} has an unknown suffix {suffix:?}; {example}")
        }
    })?;
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is too large; sizes must fit in 64 bits"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large; sizes must fit in 64 bits"))
}

fn suffix_multiplier(suffix: &str) -> Option<u64> {
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Shows a byte count the way a user would write it: `128KiB`, or plain
/// bytes when no suffix divides it exactly.
pub fn format_size(v: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if v != 0 && v.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", v >> shift);
        }
    }
    format!("{v}B")
}

// ---------------------------------------------------------------------------
// Deserializers: parse, then run the single-value check so that the error
// gets serde_yaml_ng's key path and line/column.

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size: bytes, or a string like 128KiB")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| {
            E::custom(format!(
                "{v} is negative; sizes are 0 or more bytes, e.g. 128KiB"
            ))
        })
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("{v} is too large; sizes must fit in 64 bits")))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
        if v < 0 {
            return Err(E::custom(format!(
                "{v} is negative; sizes are 0 or more bytes, e.g. 128KiB"
            )));
        }
        self.visit_u128(v as u128)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(format!(
            "{v} is not a whole number of bytes; write bytes or a size like 128KiB"
        )))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
        parse_size(s).map_err(E::custom)
    }
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor)
}

pub(super) fn de_track_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = de_size(d)?;
    check_track_size(v).map_err(|m| de::Error::custom(format!("track_size: {m}")))?;
    Ok(v)
}

pub(super) fn de_max_io<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = de_size(d)?;
    check_max_io(v).map_err(|m| de::Error::custom(format!("ublk.max_io: {m}")))?;
    Ok(v as u32)
}

/// Integers are read as i64 so that a negative or huge value gets our range
/// message rather than serde's "expected u32".
pub(super) fn de_int<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    check: fn(i64) -> Result<(), String>,
) -> Result<i64, D::Error> {
    let v = i64::deserialize(d)?;
    check(v).map_err(|m| de::Error::custom(format!("{key}: {m}")))?;
    Ok(v)
}

pub(super) fn de_ublk_id<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    Ok(de_int(d, "ublk.id", check_ublk_id)? as i32)
}
pub(super) fn de_queues<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "ublk.queues", check_queues)? as u32)
}
pub(super) fn de_depth<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "ublk.depth", check_depth)? as u32)
}
pub(super) fn de_batch<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "restore.batch", check_copy_tracks)? as u32)
}
pub(super) fn de_max_inflight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(de_int(d, "restore.max_inflight", check_copy_tracks)? as u32)
}

pub(super) fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !s.is_empty() && s.parse::<std::net::SocketAddr>().is_err() {
        return Err(de::Error::custom(format!(
            "metrics.listen {s:?} is not an ADDR:PORT (e.g. 127.0.0.1:9477)"
        )));
    }
    Ok(s)
}

pub(super) fn de_path_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    Ok(PathBuf::from(String::deserialize(d)?))
}

pub(super) fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_name(&s).map_err(de::Error::custom)?;
    Ok(s)
}

pub(super) fn de_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let p = PathBuf::from(String::deserialize(d)?);
    check_path(&p).map_err(de::Error::custom)?;
    Ok(p)
}

/// A section written as a bare key (`ublk:` with nothing under it) is YAML
/// null; it means "all defaults", not an error.
pub(super) fn de_section<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert_eq!(parse_size("128 k"), Ok(128 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("7B"), Ok(7));
        assert!(parse_size("1KB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("-4KiB").unwrap_err().contains("negative"));
        assert!(parse_size("1.5MiB").unwrap_err().contains("fractional"));
        assert!(parse_size("4XiB").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn format_sizes() {
        assert_eq!(format_size(131072), "128KiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(16 << 20), "16MiB");
    }
}
