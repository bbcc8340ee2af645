//! The few fields of MQTT 3.1.1 packets the fleet's gate reads from clients it does not trust
//! yet: the fixed header, a CONNECT's client id, will topic and login, a PUBLISH's topic and a
//! SUBSCRIBE's filters. Byte-level and without I/O, so the fuzz build reaches it without the
//! fleet's server; every read is bounds-checked and a short or lying packet is [`Malformed`].

/// Why a packet could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed MQTT packet: {0}")]
pub struct Malformed(pub &'static str);

/// MQTT control packet types the gate tells apart.
pub mod kind {
    /// CONNECT.
    pub const CONNECT: u8 = 1;
    /// PUBLISH.
    pub const PUBLISH: u8 = 3;
    /// SUBSCRIBE.
    pub const SUBSCRIBE: u8 = 8;
}

/// The control packet type of a whole packet (the high nibble of its first byte).
pub fn packet_type(packet: &[u8]) -> Option<u8> {
    packet.first().map(|b| b >> 4)
}

/// The length of a packet's fixed header: the type byte and one to four length bytes.
pub fn header_len(packet: &[u8]) -> usize {
    1 + packet
        .get(1..)
        .unwrap_or_default()
        .iter()
        .position(|b| b & 0x80 == 0)
        .map_or(packet.len().saturating_sub(1), |i| i + 1)
}

/// Decodes the remaining length from the bytes after the type byte, as they arrive: `Ok(None)`
/// while more length bytes are needed, the length once complete; more than four is malformed.
pub fn remaining_length(bytes: &[u8]) -> Result<Option<usize>, Malformed> {
    let mut length = 0usize;
    for (shift, byte) in bytes.iter().enumerate() {
        if shift == 4 {
            break;
        }
        length |= usize::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            return Ok(Some(length));
        }
    }
    if bytes.len() >= 4 {
        Err(Malformed("remaining length over four bytes"))
    } else {
        Ok(None)
    }
}

/// An MQTT string or binary field at `at`: two length bytes, then the bytes; moves `at` past it.
pub fn field<'a>(body: &'a [u8], at: &mut usize) -> Result<&'a [u8], Malformed> {
    let start = *at;
    let len = body
        .get(start..start.saturating_add(2))
        .filter(|b| b.len() == 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or(Malformed("truncated packet"))?;
    let from = start + 2;
    let bytes = body
        .get(from..from + len)
        .ok_or(Malformed("truncated packet"))?;
    *at = from + len;
    Ok(bytes)
}

/// What the gate reads from a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// The client id, as sent (UTF-8 checked, nothing else).
    pub client_id: &'a [u8],
    /// The last will's topic, when there is a will.
    pub will_topic: Option<&'a [u8]>,
    /// The user name, when given.
    pub user: Option<&'a [u8]>,
    /// The password, when given.
    pub password: Option<&'a [u8]>,
}

/// Reads a CONNECT up to its client id: the gate judges the id before anything after it.
pub fn connect_client_id(packet: &[u8]) -> Result<&[u8], Malformed> {
    connect_head(packet).map(|(_, id, _)| id)
}

/// The CONNECT flags, client id, and where the fields after the id start.
fn connect_head(packet: &[u8]) -> Result<(u8, &[u8], usize), Malformed> {
    if packet_type(packet) != Some(kind::CONNECT) {
        return Err(Malformed("the first packet is not a CONNECT"));
    }
    let body = packet.get(header_len(packet)..).unwrap_or_default();
    let mut at = 0;
    let _protocol = field(body, &mut at)?;
    // Level, flags, keep-alive.
    let flags = *body.get(at + 1).ok_or(Malformed("truncated CONNECT"))?;
    if body.len() < at + 4 {
        return Err(Malformed("truncated CONNECT"));
    }
    at += 4;
    let client_id = field(body, &mut at)?;
    Ok((flags, client_id, at))
}

/// Reads a whole CONNECT packet.
pub fn parse_connect(packet: &[u8]) -> Result<Connect<'_>, Malformed> {
    let (flags, client_id, mut at) = connect_head(packet)?;
    let body = packet.get(header_len(packet)..).unwrap_or_default();
    let mut will_topic = None;
    if flags & 0x04 != 0 {
        will_topic = Some(field(body, &mut at)?);
        let _will_message = field(body, &mut at)?;
    }
    let user = (flags & 0x80 != 0)
        .then(|| field(body, &mut at))
        .transpose()?;
    let password = (flags & 0x40 != 0)
        .then(|| field(body, &mut at))
        .transpose()?;
    Ok(Connect {
        client_id,
        will_topic,
        user,
        password,
    })
}

/// The topics a client packet names: what an access rule must allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names<'a> {
    /// A CONNECT (a second one on a connection is refused by the gate).
    Connect,
    /// A PUBLISH to this topic.
    Publish(&'a [u8]),
    /// A SUBSCRIBE to these filters, read one by one as the iterator goes.
    Subscribe(Filters<'a>),
    /// Anything else (acknowledgements, pings, DISCONNECT): names no topic.
    Other,
}

/// The filters of a SUBSCRIBE, in order; a malformed one ends the iteration with its error.
/// Nothing is collected: a packet of a million filters costs no memory to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Filters<'a> {
    type Item = Result<&'a [u8], Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.body.len() {
            return None;
        }
        match field(self.body, &mut self.at) {
            Ok(filter) => {
                // The options byte.
                self.at += 1;
                Some(Ok(filter))
            }
            Err(e) => {
                self.at = self.body.len();
                Some(Err(e))
            }
        }
    }
}

/// Reads the topic or filters of a whole client packet.
pub fn names(packet: &[u8]) -> Result<Names<'_>, Malformed> {
    let body = packet.get(header_len(packet)..).unwrap_or_default();
    let mut at = 0;
    match packet_type(packet) {
        Some(kind::CONNECT) => Ok(Names::Connect),
        Some(kind::PUBLISH) => Ok(Names::Publish(field(body, &mut at)?)),
        // The packet id, then (filter, options) pairs.
        Some(kind::SUBSCRIBE) => Ok(Names::Subscribe(Filters { body, at: 2 })),
        _ => Ok(Names::Other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![kind << 4];
        let mut len = body.len();
        while len >= 0x80 {
            p.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        p.push(len as u8);
        p.extend(body);
        p
    }

    fn connect(flags: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 10];
        for f in fields {
            body.extend((f.len() as u16).to_be_bytes());
            body.extend(*f);
        }
        packet(kind::CONNECT, &body)
    }

    #[test]
    fn a_connect_gives_its_id_will_and_login() {
        let c = connect(
            0x04 | 0x80 | 0x40,
            &[b"dev-1", b"w/t", b"gone", b"user", b"pw"],
        );
        assert_eq!(
            parse_connect(&c).unwrap(),
            Connect {
                client_id: b"dev-1",
                will_topic: Some(b"w/t"),
                user: Some(b"user"),
                password: Some(b"pw"),
            }
        );
        let plain = connect(0x02, &[b"x"]);
        assert_eq!(parse_connect(&plain).unwrap().user, None);
    }

    #[test]
    fn short_and_lying_packets_are_malformed() {
        let c = connect(0x80, &[b"dev-1", b"user"]);
        for end in 0..c.len() {
            assert!(parse_connect(&c[..end]).is_err(), "cut at {end}");
        }
        // A user flag with no user field.
        assert!(parse_connect(&connect(0x80, &[b"dev-1"])).is_err());
        assert!(parse_connect(&packet(kind::PUBLISH, &[0, 1, b'a'])).is_err());
        assert!(names(&packet(kind::PUBLISH, &[0, 9, b'a'])).is_err());
        let bad = packet(kind::SUBSCRIBE, &[0, 1, 0, 5, b'a']);
        let Names::Subscribe(mut filters) = names(&bad).unwrap() else {
            panic!("not a SUBSCRIBE")
        };
        assert!(filters.next().unwrap().is_err());
        assert_eq!(filters.next(), None);
        // The id comes first: a bad tail does not hide it.
        let c = connect(0x80, &[b"dev/1"]);
        assert_eq!(connect_client_id(&c), Ok(&b"dev/1"[..]));
    }

    #[test]
    fn publish_and_subscribe_name_their_topics() {
        assert_eq!(
            names(&packet(kind::PUBLISH, &[0, 3, b'a', b'/', b'b', 1, 2])).unwrap(),
            Names::Publish(b"a/b")
        );
        let sub = packet(kind::SUBSCRIBE, &[0, 1, 0, 1, b'x', 1, 0, 2, b'y', b'z', 0]);
        let Names::Subscribe(filters) = names(&sub).unwrap() else {
            panic!("not a SUBSCRIBE")
        };
        let filters: Result<Vec<&[u8]>, _> = filters.collect();
        assert_eq!(filters.unwrap(), [&b"x"[..], b"yz"]);
        assert_eq!(names(&[0xc0, 0]).unwrap(), Names::Other);
        assert_eq!(names(&[]).unwrap(), Names::Other);
    }

    #[test]
    fn remaining_lengths_decode_as_they_arrive() {
        assert_eq!(remaining_length(&[]), Ok(None));
        assert_eq!(remaining_length(&[0x05]), Ok(Some(5)));
        assert_eq!(remaining_length(&[0x80]), Ok(None));
        assert_eq!(remaining_length(&[0x80, 0x01]), Ok(Some(128)));
        assert_eq!(
            remaining_length(&[0xff, 0xff, 0xff, 0x7f]),
            Ok(Some(268_435_455))
        );
        assert!(remaining_length(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(header_len(&[0x30, 0x80, 0x01, 9]), 3);
    }
}
