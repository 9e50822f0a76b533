//! Shared by the tests that run the `http_orders` example as a process: building it, starting
//! it on an ephemeral loopback port, and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::child;

/// The example binary, built now (with `features`) so it is never stale: `cargo test` with a
/// filter does not rebuild examples; this is a no-op when it is up to date.
pub fn example(name: &str, features: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--example", name]);
    if !features.is_empty() {
        cargo.args(["--features", features]);
    }
    if release {
        cargo.arg("--release");
    }
    assert!(cargo.status().expect("cargo build").success());
    dir.join("examples").join(name)
}

/// A running `http_orders`; killed (`SIGKILL`) when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Its log lines so far.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Its stderr so far.
    pub stderr: child::Stderr,
}

impl Server {
    /// Starts `http_orders` (built with `features`) with `args` on 127.0.0.1:0.
    pub fn start(features: &str, args: &[&str]) -> Server {
        let mut child = Command::new(example("http_orders", features))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example");
        let stderr = child::Stderr::capture(&mut child, "http_orders");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let status = child.wait().expect("reap");
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "the example exited ({status}) before listening; its stderr:\n{}",
                    stderr.text()
                );
            };
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        Server {
            child,
            addr,
            log,
            stderr,
        }
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// `SIGKILL`s it; fails the test (with its stderr) if it had died on its own.
    pub fn kill(&mut self) {
        child::sigkill(&mut self.child, &self.stderr, "http_orders");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange: (status, lower-cased headers, body), or `None` if the connection
/// failed (the server was killed).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, HashMap<String, String>, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let (status, headers, body) = parse_response(&raw)?;
    Some((status, headers.into_iter().collect(), body))
}

/// Status, header lines (lower-cased names, in order), body as sent.
pub type Parsed = (u16, Vec<(String, String)>, Vec<u8>);

/// A raw HTTP/1.1 response, parsed.
pub fn parse_response(raw: &[u8]) -> Option<Parsed> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, raw[split + 4..].to_vec()))
}
