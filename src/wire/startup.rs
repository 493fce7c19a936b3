//! The first packet of a connection: SSLRequest, GSSENCRequest, CancelRequest
//! or a StartupMessage. Parsed from bytes with no I/O besides the bounded read.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Postgres rejects startup packets above this size too.
pub const MAX_STARTUP_PACKET: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3: u16 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}: meridian speaks 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
    #[error("connection closed during startup")]
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupMessage {
    pub minor_version: u16,
    /// Parameters in the order the client sent them, `_pq_.` options excluded.
    pub params: Vec<(String, String)>,
    /// Protocol options (`_pq_.*`) the client asked for; meridian supports none.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user").filter(|u| !u.is_empty())
    }

    /// The database; Postgres defaults it to the user name.
    pub fn database(&self) -> Option<&str> {
        self.get("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }
}

/// Reads one length-prefixed startup-phase packet. An I/O error or EOF is
/// reported as `Closed`, since there is nobody left to answer.
pub async fn read_first_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<FirstPacket, StartupError> {
    let mut len_buf = [0u8; 4];
    stream
        .read_exact(&mut len_buf)
        .await
        .map_err(|_| StartupError::Closed)?;
    let len = u32::from_be_bytes(len_buf);
    if !(8..=MAX_STARTUP_PACKET as u32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|_| StartupError::Closed)?;
    parse_first_packet(&body)
}

/// Parses a startup-phase packet body (everything after the length).
pub fn parse_first_packet(body: &[u8]) -> Result<FirstPacket, StartupError> {
    let code = u32::from_be_bytes(
        body.get(..4)
            .ok_or(StartupError::Malformed("too short"))?
            .try_into()
            .unwrap_or_default(),
    );
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST if rest.is_empty() => Ok(FirstPacket::GssEncRequest),
        CANCEL_REQUEST if rest.len() == 8 => Ok(FirstPacket::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            Err(StartupError::Malformed("wrong length for request code"))
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, code as u16);
            if major != PROTOCOL_3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            parse_params(rest, minor).map(FirstPacket::Startup)
        }
    }
}

fn parse_params(mut rest: &[u8], minor_version: u16) -> Result<StartupMessage, StartupError> {
    let mut msg = StartupMessage {
        minor_version,
        ..Default::default()
    };
    loop {
        let key = take_cstr(&mut rest)?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut rest)?;
        if key.starts_with("_pq_.") {
            msg.protocol_options.push(key);
        } else {
            msg.params.push((key, value));
        }
    }
    if !rest.is_empty() {
        return Err(StartupError::Malformed("bytes after the final terminator"));
    }
    Ok(msg)
}

fn take_cstr(rest: &mut &[u8]) -> Result<String, StartupError> {
    let (s, after) =
        crate::wire::frame::cstr(rest).ok_or(StartupError::Malformed("missing terminator"))?;
    let s = std::str::from_utf8(s)
        .map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?
        .to_owned();
    *rest = after;
    Ok(s)
}

/// Encodes a v3.0 StartupMessage carrying `params` (used towards the backend).
pub fn encode_startup(params: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&(u32::from(PROTOCOL_3) << 16).to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = body.len() as u32;
    body[..4].copy_from_slice(&len.to_be_bytes());
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let params = vec![
            ("user".to_string(), "app".to_string()),
            ("database".to_string(), "shop".to_string()),
        ];
        let bytes = encode_startup(&params);
        match parse_first_packet(&bytes[4..]).unwrap() {
            FirstPacket::Startup(m) => {
                assert_eq!(m.params, params);
                assert_eq!(m.user(), Some("app"));
                assert_eq!(m.database(), Some("shop"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn special_requests() {
        assert_eq!(
            parse_first_packet(&SSL_REQUEST.to_be_bytes()),
            Ok(FirstPacket::SslRequest)
        );
        assert_eq!(
            parse_first_packet(&GSSENC_REQUEST.to_be_bytes()),
            Ok(FirstPacket::GssEncRequest)
        );
        let mut cancel = CANCEL_REQUEST.to_be_bytes().to_vec();
        cancel.extend_from_slice(&7i32.to_be_bytes());
        cancel.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_first_packet(&cancel),
            Ok(FirstPacket::Cancel { pid: 7, secret: -9 })
        );
    }

    #[test]
    fn rejects_protocol_2_and_garbage() {
        assert!(matches!(
            parse_first_packet(&0x0002_0000u32.to_be_bytes()),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        assert!(parse_first_packet(b"\x00\x03\x00\x00user").is_err());
        assert!(parse_first_packet(b"\x00\x03").is_err());
    }

    #[test]
    fn protocol_options_are_set_aside() {
        let mut body = (3u32 << 16 | 2).to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0u\0_pq_.thing\0x\0\0");
        let FirstPacket::Startup(m) = parse_first_packet(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.minor_version, 2);
        assert_eq!(m.protocol_options, vec!["_pq_.thing".to_string()]);
        assert_eq!(m.params.len(), 1);
    }

    #[tokio::test]
    async fn length_prefix_of_two_gib_is_refused_without_reading_it() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(&0x8000_0000u32.to_be_bytes())
            .await
            .unwrap();
        assert_eq!(
            read_first_packet(&mut server).await,
            Err(StartupError::BadLength(0x8000_0000))
        );
    }
}
