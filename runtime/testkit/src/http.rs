//! HTTP over ureq: every status is an answer, not an error.

use std::time::Duration;

use serde_json::Value;
use ureq::http::HeaderMap;

/// The bearer token [`admin`] sends: configure the device under test with it.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The largest body a [`Reply`] reads.
const BODY_LIMIT: u64 = 256 << 20;

/// A ureq agent returning non-2xx statuses as responses, with a 30 s limit per request.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A response read whole: status, headers and body.
#[derive(Debug)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body, up to 256 MiB.
    pub body: Vec<u8>,
}

impl Reply {
    /// Reads a response whole; panics if the request failed (a transport error, not a status).
    pub fn from_response(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Self {
        let mut r = r.unwrap_or_else(|e| panic!("HTTP request failed: {e}"));
        let body = r
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("reading the response body: {e}"));
        Self {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body,
        }
    }

    /// The value of header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics, showing the body, if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET url`.
pub fn get(url: &str) -> Reply {
    Reply::from_response(agent().get(url).call())
}

/// `POST url` with `body` as `content_type`.
pub fn post(url: &str, content_type: &str, body: &[u8]) -> Reply {
    Reply::from_response(
        agent()
            .post(url)
            .header("content-type", content_type)
            .send(body),
    )
}

/// `POST url` with `body` as `application/json`.
pub fn post_json(url: &str, body: &Value) -> Reply {
    post(url, "application/json", body.to_string().as_bytes())
}

/// [`post_json`] with extra request headers.
pub fn post_json_with(url: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut request = agent().post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Reply::from_response(request.send(body.to_string().as_bytes()))
}

/// `METHOD url` with `Authorization: Bearer` [`ADMIN_TOKEN`]; `body` is sent with `POST` and
/// `PUT` and must be empty otherwise. Panics on any other method.
pub fn admin(method: &str, url: &str, body: &[u8]) -> Reply {
    let a = agent();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let no_body = || assert!(body.is_empty(), "{method} {url} sends no body");
    Reply::from_response(match method {
        "GET" => {
            no_body();
            a.get(url).header("authorization", &auth).call()
        }
        "DELETE" => {
            no_body();
            a.delete(url).header("authorization", &auth).call()
        }
        "POST" => a.post(url).header("authorization", &auth).send(body),
        "PUT" => a.put(url).header("authorization", &auth).send(body),
        _ => panic!("admin: unsupported method {method}"),
    })
}

/// `GET url`: the status and the body as JSON, or as a JSON string when it is not JSON.
pub fn get_json(url: &str) -> (u16, Value) {
    let r = get(url);
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| Value::String(r.text()));
    (r.status, v)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// Answers each request with `status` and `body`; returns the URL and the requests seen
    /// (head lines, then the body).
    fn server(answers: Vec<(u16, &'static str)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end().to_owned();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    seen.push(line);
                }
                let mut request_body = vec![0; length];
                reader.read_exact(&mut request_body).unwrap();
                seen.push(String::from_utf8(request_body).unwrap());
                write!(
                    reader.get_mut(),
                    "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (url, seen)
    }

    #[test]
    fn statuses_are_replies_and_bodies_are_read() {
        let (url, seen) = server(vec![
            (404, "nope"),
            (200, r#"{"a":1}"#),
            (500, "not json"),
            (201, ""),
        ]);
        let r = get(&format!("{url}/missing"));
        assert_eq!((r.status, r.text().as_str()), (404, "nope"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(get_json(&url), (200, serde_json::json!({"a": 1})));
        assert_eq!(get_json(&url), (500, Value::String("not json".into())));
        let r = admin("POST", &format!("{url}/admin/x"), b"payload");
        assert_eq!(r.status, 201);
        let seen = seen.join().unwrap();
        assert!(
            seen.iter().any(|l| l.starts_with("GET /missing ")),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|l| l.starts_with("POST /admin/x ")),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {ADMIN_TOKEN}"))),
            "{seen:?}"
        );
        assert_eq!(seen.last().unwrap(), "payload");
    }

    #[test]
    #[should_panic(expected = "not JSON")]
    fn json_shows_what_it_could_not_parse() {
        Reply {
            status: 200,
            headers: HeaderMap::new(),
            body: b"plain".to_vec(),
        }
        .json();
    }
}
