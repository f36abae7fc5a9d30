//! The client against a scripted server of our own: a `TcpListener` on 127.0.0.1 that reads
//! one request and answers with a canned HTTP response (or never answers), so each fault maps
//! to its typed error and class. The real server (llama-server) is exercised elsewhere.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;

/// What the scripted server does with the one request it accepts.
enum Script {
    /// Answer with this status line and body.
    Answer(&'static str, String),
    /// Read the request, then hold the connection open without a byte until the test ends.
    Hang(mpsc::Receiver<()>),
}

/// Starts a server for one request; the handle yields the raw request it read.
fn serve(script: Script) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let server = format!("http://{}", listener.local_addr().expect("bound"));
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("one connection");
        let request = read_request(&mut stream);
        match script {
            Script::Answer(status, body) => {
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).expect("write answer");
            }
            // Returns when the test drops the sender, after the client has given up.
            Script::Hang(done) => {
                let _ = done.recv();
            }
        }
        request
    });
    (server, handle)
}

/// Reads headers and a `Content-Length` body.
fn read_request(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("read request");
        assert!(n > 0, "client closed before the request was complete");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().expect("a length"))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

fn settings(server: &str) -> ClientSettings {
    ClientSettings {
        server: server.to_string(),
        model: "smollm2".into(),
        sampling: Sampling {
            temperature: 0.7,
            top_p: 0.9,
            max_tokens: 64,
            seed: Some(42),
        },
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(500),
        api_key: None,
    }
}

fn ask(server: &str) -> Result<Completion, ClientError> {
    ChatClient::new(settings(server))
        .expect("valid settings")
        .complete(&[Message::new("user", "Hi")], ResponseFormat::Text)
}

const GOOD: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;

#[test]
fn a_good_completion_and_the_request_it_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("key");
    std::fs::write(&key_path, "sk-test-secret\n").expect("write key");
    let (server, handle) = serve(Script::Answer("200 OK", GOOD.into()));
    let client = ChatClient::new(ClientSettings {
        api_key: Some(KeySource::File(key_path)),
        ..settings(&server)
    })
    .expect("valid settings");
    let got = client
        .complete(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            ResponseFormat::JsonObject,
        )
        .expect("a completion");
    assert_eq!(
        got,
        Completion {
            content: "Hello there.".into(),
            finish_reason: Some("stop".into()),
            prompt_tokens: Some(9),
            completion_tokens: Some(3),
        }
    );
    assert!(!got.truncated());
    let request = handle.join().expect("server thread");
    let (head, body) = request.split_once("\r\n\r\n").expect("headers and body");
    assert!(
        head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("authorization: Bearer sk-test-secret")),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).expect("JSON request");
    let expected = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 42, "stream": false,
        "response_format": {"type": "json_object"}
    });
    assert_eq!(body, expected);
    // The key is read and sent, never shown.
    assert!(!format!("{client:?}").contains("secret"), "{client:?}");
    assert!(format!("{client:?}").contains("<redacted>"));
}

#[test]
fn a_base_url_ending_in_v1_is_not_doubled_and_text_mode_sends_no_format() {
    let (server, handle) = serve(Script::Answer("200 OK", GOOD.into()));
    ask(&format!("{server}/v1/")).expect("a completion");
    let request = handle.join().expect("server thread");
    assert!(
        request.starts_with("POST /v1/chat/completions "),
        "{request}"
    );
    assert!(!request.contains("response_format"), "{request}");
    assert!(
        !request.to_lowercase().contains("authorization"),
        "{request}"
    );
}

/// Each canned answer and the error, class and label it must give.
#[test]
fn http_errors_and_bad_bodies_are_typed_and_classed() {
    let cases: [(&str, &str, &str, ErrorClass); 6] = [
        (
            "500 Internal Server Error",
            r#"{"error":"boom"}"#,
            "http_5xx",
            ErrorClass::Transient,
        ),
        (
            "503 Service Unavailable",
            "loading model",
            "http_5xx",
            ErrorClass::Transient,
        ),
        (
            "429 Too Many Requests",
            "slow down",
            "http_429",
            ErrorClass::Transient,
        ),
        (
            "400 Bad Request",
            r#"{"error":"bad"}"#,
            "http_4xx",
            ErrorClass::Persistent,
        ),
        (
            "200 OK",
            "{\"choices\": [ {\"mess",
            "malformed",
            ErrorClass::Persistent,
        ),
        (
            "200 OK",
            r#"{"choices":[]}"#,
            "no_choices",
            ErrorClass::Persistent,
        ),
    ];
    for (status, body, label, class) in cases {
        let (server, handle) = serve(Script::Answer(status, body.into()));
        let err = ask(&server).expect_err(status);
        handle.join().expect("server thread");
        assert_eq!(
            (err.label(), err.class()),
            (label, class),
            "{status} {body}: {err}"
        );
        if let ClientError::Status {
            status: code,
            body: text,
            ..
        } = &err
        {
            assert_eq!(status.split(' ').next(), Some(code.to_string().as_str()));
            assert_eq!(text, body);
        }
    }
    let (server, handle) = serve(Script::Answer(
        "200 OK",
        r#"{"choices":[{"message":{"role":"assistant","content":null}}]}"#.into(),
    ));
    let err = ask(&server).expect_err("null content");
    handle.join().expect("server thread");
    assert!(matches!(err, ClientError::Malformed { .. }), "{err}");
}

#[test]
fn a_server_that_never_answers_times_out_as_transient() {
    let (tx, rx) = mpsc::channel();
    let (server, handle) = serve(Script::Hang(rx));
    let started = Instant::now();
    let err = ask(&server).expect_err("no answer");
    let waited = started.elapsed();
    drop(tx);
    handle.join().expect("server thread");
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                phase: "answer",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_transient());
    // The read timeout is 500 ms; a client that ignored it would wait until the test ends.
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn a_refused_connection_is_transient() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("bound"));
    drop(listener);
    let err = ask(&server).expect_err("nothing listens");
    assert_eq!(err.label(), "transport", "{err}");
    assert!(err.is_transient());
}

#[test]
fn urls_and_keys_that_cannot_work_are_persistent() {
    let https = ChatClient::new(settings("https://127.0.0.1:8443")).expect_err("no TLS");
    assert_eq!(
        (https.label(), https.class()),
        ("request", ErrorClass::Persistent)
    );
    let missing = ChatClient::new(ClientSettings {
        api_key: Some(KeySource::Env("DREAMLOOP_TEST_KEY_THAT_IS_NOT_SET".into())),
        ..settings("http://127.0.0.1:1")
    })
    .expect_err("unset variable");
    assert_eq!(missing.label(), "api_key");
    assert!(missing
        .to_string()
        .contains("DREAMLOOP_TEST_KEY_THAT_IS_NOT_SET"));
    std::env::set_var("DREAMLOOP_TEST_KEY_SET", "  k-123  ");
    assert_eq!(
        ApiKey::load(&KeySource::Env("DREAMLOOP_TEST_KEY_SET".into())).expect("set"),
        ApiKey("k-123".into())
    );
    assert_eq!(
        format!("{:?}", ApiKey("k-123".into())),
        "ApiKey(<redacted>)"
    );
}

#[test]
fn loopback_means_this_machine() {
    for (url, loopback) in [
        ("http://127.0.0.1:8080", true),
        ("http://127.3.4.5", true),
        ("http://localhost:11434/v1", true),
        ("http://[::1]:8000", true),
        ("http://192.168.1.20:8080", false),
        ("http://0.0.0.0:8080", false),
        ("http://gpu-box.lan:8000", false),
    ] {
        assert_eq!(is_loopback(url), Ok(loopback), "{url}");
    }
    for bad in [
        "https://127.0.0.1",
        "127.0.0.1:8080",
        "ftp://localhost",
        "http://",
    ] {
        assert!(is_loopback(bad).is_err(), "{bad}");
    }
}

#[test]
fn backoff_doubles_to_its_cap_and_resets() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
    let delays: Vec<u64> = (0..6).map(|_| b.fail().as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
    assert_eq!(b.failures(), 6);
    b.succeed();
    assert_eq!(b.fail(), Duration::from_secs(1));
}
