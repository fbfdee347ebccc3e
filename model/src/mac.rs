//! MAC addresses.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit Ethernet MAC address (IEEE 802).
///
/// Text form: six two-digit hex bytes separated by `:` (or `-` when parsing),
/// printed lower case with `:`, e.g. `52:54:00:ab:cd:ef`. Serialised as that
/// string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// True for a multicast (group) address (I/G bit, the lowest bit of the
    /// first byte), which a NIC must not use as its own address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 == 0x01
    }

    /// True for a locally administered address (U/L bit, the second lowest
    /// bit of the first byte).
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 == 0x02
    }

    /// The bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> MacAddr {
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a MAC address (or MAC prefix) did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)")]
pub struct MacParseError(pub String);

/// Parses `want` two-digit hex bytes separated by `:` or `-` (a MAC is 6; a
/// MAC prefix fewer). `None` when the text is anything else.
pub fn parse_hex_bytes(s: &str, want: usize) -> Option<Vec<u8>> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != want {
        return None;
    }
    parts
        .iter()
        .map(|p| {
            // from_str_radix alone would take "+5".
            if p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()) {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect()
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_hex_bytes(s, 6).ok_or_else(|| MacParseError(s.to_string()))?;
        let mut out = [0u8; 6];
        out.copy_from_slice(&bytes);
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m: MacAddr = "52:54:00:AB:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!("52-54-00-ab-cd-ef".parse::<MacAddr>().unwrap(), m);
        assert!(!m.is_multicast());
        // QEMU's 52:54:00 is a locally administered prefix.
        assert!(m.is_local());
        assert!(!"00:1b:21:00:00:01".parse::<MacAddr>().unwrap().is_local());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:54:00:ab:cd:ef\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "zz:54:00:ab:cd:ef",
            "5:54:00:ab:cd:ef",
            "525:4:00:ab:cd:ef",
            "+5:54:00:ab:cd:ef",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(parse_hex_bytes("52:54:00", 3), Some(vec![0x52, 0x54, 0]));
        assert_eq!(parse_hex_bytes("52:54:00", 2), None);
    }
}
