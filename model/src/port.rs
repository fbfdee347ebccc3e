//! Ports a Hostlo part serves: `80/tcp`, `53/udp`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Transport protocol of a port. Serialised as `"tcp"` / `"udp"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a port (or protocol) did not parse. The text names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortParseError {
    /// The protocol is neither `tcp` nor `udp`.
    #[error("{0:?} is not \"tcp\" or \"udp\"")]
    Proto(String),
    /// The number is not 1 to 65535.
    #[error("{item:?}: {number:?} is not a port (1 to 65535)")]
    Number {
        /// The whole item.
        item: String,
        /// Its number part.
        number: String,
    },
}

impl FromStr for Proto {
    type Err = PortParseError;
    fn from_str(s: &str) -> Result<Proto, PortParseError> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(PortParseError::Proto(other.to_string())),
        }
    }
}

/// A port and its protocol. Text form `80/tcp` (`80` alone means TCP);
/// serialised as `{"port": 80, "proto": "tcp"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Port {
    /// The port number, 1 to 65535.
    pub port: u16,
    /// Its protocol.
    pub proto: Proto,
}

impl Port {
    /// A TCP port.
    pub fn tcp(port: u16) -> Port {
        Port {
            port,
            proto: Proto::Tcp,
        }
    }

    /// A UDP port.
    pub fn udp(port: u16) -> Port {
        Port {
            port,
            proto: Proto::Udp,
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

impl FromStr for Port {
    type Err = PortParseError;
    fn from_str(item: &str) -> Result<Port, PortParseError> {
        let (num, proto) = item.split_once('/').unwrap_or((item, "tcp"));
        let port =
            num.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| PortParseError::Number {
                    item: item.to_string(),
                    number: num.to_string(),
                })?;
        Ok(Port {
            port,
            proto: proto.parse()?,
        })
    }
}

/// Parses a comma-separated list such as `80/tcp, 53/udp,8080` (the Hostlo
/// ports annotation); empty items are skipped. Sorted, without duplicates.
pub fn parse_port_list(s: &str) -> Result<Vec<Port>, PortParseError> {
    let mut out = s
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<Port>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_serde() {
        assert_eq!("80".parse::<Port>().unwrap(), Port::tcp(80));
        assert_eq!("53/udp".parse::<Port>().unwrap(), Port::udp(53));
        assert_eq!(Port::udp(53).to_string(), "53/udp");
        assert_eq!(
            serde_json::to_string(&Port::tcp(80)).unwrap(),
            r#"{"port":80,"proto":"tcp"}"#
        );
        assert_eq!(
            parse_port_list(" 8080,80/tcp, 53/udp,,80").unwrap(),
            vec![Port::udp(53), Port::tcp(80), Port::tcp(8080)]
        );
    }

    #[test]
    fn rejects() {
        for (bad, needle) in [
            ("0", "\"0\""),
            ("65536/tcp", "65536"),
            ("x/udp", "\"x\""),
            ("80/sctp", "sctp"),
            ("-1", "-1"),
        ] {
            let e = bad.parse::<Port>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
