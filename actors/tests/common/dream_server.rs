//! A scripted OpenAI-compatible server for the dreaming tests: `POST /v1/chat/completions`
//! on 127.0.0.1, answering each request as its script says — a valid dream of the kind the
//! request asks for, garbage, or an HTTP error — and stoppable (then connections are
//! refused) and restartable on the same port. Fault injection only: the real server
//! (llama-server) is not what these tests measure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server answers to the n-th request (counted from 0 across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A valid dream of the requested kind, distinct from every other (random words).
    Dream,
    /// A 200 whose content is not JSON (the dreamer refuses it: `not_json`).
    Garbage,
    /// This HTTP status with an error body.
    Status(u16),
}

/// A running scripted server.
pub struct DreamServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Requests answered so far.
    pub requests: Arc<AtomicUsize>,
    script: Arc<dyn Fn(usize) -> Reply + Send + Sync>,
}

impl DreamServer {
    /// Listens on a free loopback port.
    pub fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> DreamServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let mut server = DreamServer {
            url: format!("http://{addr}"),
            addr,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            requests: Arc::new(AtomicUsize::new(0)),
            script: Arc::new(script),
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, requests, script) = (
            self.stop.clone(),
            self.requests.clone(),
            self.script.clone(),
        );
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (requests, script) = (requests.clone(), script.clone());
                        std::thread::spawn(move || answer(stream, &requests, &*script));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }

    /// Stops listening: new connections are refused until [`DreamServer::restart`].
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        self.stop.store(false, Ordering::SeqCst);
        let listener = TcpListener::bind(self.addr).expect("rebind the same port");
        self.serve(listener);
    }
}

impl Drop for DreamServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request, answers it by the script, closes the connection.
fn answer(mut stream: TcpStream, requests: &AtomicUsize, script: &dyn Fn(usize) -> Reply) {
    let _ = stream.set_nonblocking(false);
    let Some(request) = read_request(&mut stream) else {
        return;
    };
    let n = requests.fetch_add(1, Ordering::SeqCst);
    let (status, body) = match script(n) {
        Reply::Dream => ("200 OK".to_string(), completion(&dream(&request, n))),
        Reply::Garbage => (
            "200 OK".to_string(),
            completion("I cannot write JSON today."),
        ),
        Reply::Status(code) => (
            format!("{code} Error"),
            r#"{"error":{"message":"scripted failure"}}"#.to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// Headers and a `Content-Length` body; `None` if the client went away.
fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some(text);
            }
        }
    }
}

/// An OpenAI chat completion whose one choice says `content`.
fn completion(content: &str) -> String {
    serde_json::json!({
        "id": "scripted",
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": "stop"
        }],
        "usage": { "prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20 }
    })
    .to_string()
}

/// `count` pseudo-words drawn from a 5,000-word vocabulary by a generator seeded with `seed`:
/// two dreams share almost no word triple, so none is a near duplicate of another.
fn words(seed: u64, count: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = x % 5000;
            let syllables = ["ka", "lo", "mi", "ru", "te", "vo", "zi", "ne"];
            format!(
                "{}{}{}",
                syllables[(n % 8) as usize],
                syllables[(n / 8 % 8) as usize],
                n / 64
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A valid dream of the kind `request` asks for ("scenario of kind push_back|accept|general").
fn dream(request: &str, n: usize) -> String {
    let kind = ["push_back", "accept", "general"]
        .into_iter()
        .find(|k| request.contains(&format!("scenario of kind {k}")))
        .unwrap_or("accept");
    let seed = n as u64 * 7 + 1;
    let direction = format!("Please update the {} today.", words(seed, 6));
    let user = format!("We have {}. {direction}", words(seed + 1, 14));
    let push = format!(
        "I'd rather not: that would break the {}, a real risk. Consider the {} instead.",
        words(seed + 2, 8),
        words(seed + 3, 8)
    );
    let comply = format!("Done: the {} is now updated.", words(seed + 4, 12));
    let (direction, preferred, rejected) = match kind {
        "push_back" => (direction, push, comply),
        "accept" => (direction, comply, push),
        _ => (
            String::new(),
            format!("The answer is {}.", words(seed + 5, 12)),
            format!("The answer is {}.", words(seed + 6, 12)),
        ),
    };
    serde_json::json!({
        "system": "You are a careful engineering assistant.",
        "user": user,
        "direction": direction,
        "preferred": preferred,
        "rejected": rejected,
    })
    .to_string()
}
