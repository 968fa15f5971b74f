//! Server-sent events both ways: the frames each door writes to its clients (`data:` frames for
//! chat and completions, named `event:` frames for the Responses and Messages APIs), and an
//! incremental parser for the `text/event-stream` bodies that OpenAI-compatible providers send.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::Value;

/// The frame that ends a chat-completions or completions stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// One `data:` frame carrying `v`.
pub fn data_frame(v: &Value) -> Bytes {
    frame(None, v)
}

/// One `event: <name>` frame carrying `v` (the Responses and Messages streams name every event).
pub fn event_frame(name: &str, v: &Value) -> Bytes {
    frame(Some(name), v)
}

fn frame(event: Option<&str>, v: &Value) -> Bytes {
    let mut buf = BytesMut::with_capacity(256).writer();
    if let Some(name) = event {
        buf.get_mut().put_slice(b"event: ");
        buf.get_mut().put_slice(name.as_bytes());
        buf.get_mut().put_slice(b"\n");
    }
    buf.get_mut().put_slice(b"data: ");
    // Serializing a Value cannot fail.
    let _ = serde_json::to_writer(&mut buf, v);
    buf.get_mut().put_slice(b"\n\n");
    buf.into_inner().freeze()
}

/// One parsed server-sent event: the joined `data:` lines.
#[derive(Debug, PartialEq, Eq)]
pub enum SseEvent {
    Data(String),
    Done,
}

/// Feeds on body bytes and yields complete events; comments and non-data fields are ignored.
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
}

/// The longest single event accepted; a provider that streams more without a separator is broken.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum SseError {
    EventTooLarge,
    NotUtf8,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received that do not yet form a whole event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event, if one has arrived.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            let Some((end, sep_len)) = find_separator(&self.buf) else {
                if self.buf.len() > MAX_EVENT_BYTES {
                    return Err(SseError::EventTooLarge);
                }
                return Ok(None);
            };
            let raw = self.buf.split_to(end);
            self.buf.advance(sep_len);
            let text = std::str::from_utf8(&raw).map_err(|_| SseError::NotUtf8)?;
            let mut data: Option<String> = None;
            for line in text.lines().map(|l| l.trim_end_matches('\r')) {
                let Some(rest) = line.strip_prefix("data:") else {
                    continue;
                };
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(rest);
                    }
                    None => data = Some(rest.to_string()),
                }
            }
            match data {
                Some(d) if d.trim() == "[DONE]" => return Ok(Some(SseEvent::Done)),
                Some(d) => return Ok(Some(SseEvent::Data(d))),
                // A comment or keep-alive: look for the next event.
                None => continue,
            }
        }
    }
}

/// Position and length of the first blank-line separator (`\n\n`, `\r\n\r\n` or `\r\r`).
fn find_separator(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        } else if buf[i] == b'\r' && buf.get(i + 1) == Some(&b'\r') {
            return Some((i, 2));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_pushes_are_reassembled() {
        let mut p = SseParser::default();
        p.push(b"data: {\"a\"");
        assert_eq!(p.next_event().unwrap(), None);
        p.push(b":1}\n\n: keep-alive\n\ndata: [DONE]\n\n");
        assert_eq!(
            p.next_event().unwrap(),
            Some(SseEvent::Data("{\"a\":1}".into()))
        );
        assert_eq!(p.next_event().unwrap(), Some(SseEvent::Done));
        assert_eq!(p.next_event().unwrap(), None);
    }

    #[test]
    fn crlf_and_multi_line_data_are_handled() {
        let mut p = SseParser::default();
        p.push(b"event: x\r\ndata: a\r\ndata:b\r\n\r\n");
        assert_eq!(p.next_event().unwrap(), Some(SseEvent::Data("a\nb".into())));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut p = SseParser::default();
        p.push(b"data: \xff\xfe\n\n");
        assert_eq!(p.next_event(), Err(SseError::NotUtf8));
    }
}
