//! A Redis server for the tests, so that one `cargo test --features redis` covers the Redis
//! backend: `IDEMKV_REDIS_URL` if it is set; otherwise a `redis-server` of this test process's
//! own, on a free loopback port, when one is on `PATH` (started once per test binary, and
//! stopped by a watchdog when this process exits, however it exits; a server that exits on its
//! own before that aborts the run with its output shown); otherwise `None`, said
//! loudly on stderr — and a failure under `CI=true`, where a skipped backend would be a blind
//! test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::child;

/// The Redis URL the tests use, or `None` (skipped, loudly) when there is none.
pub fn url() -> Option<String> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    let url = URL.get_or_init(|| {
        if let Ok(url) = std::env::var("IDEMKV_REDIS_URL") {
            return Some(url);
        }
        start()
    });
    if url.is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true: the Redis tests need redis-server on PATH or IDEMKV_REDIS_URL"
        );
        eprintln!(
            "SKIPPED: no redis-server on PATH and IDEMKV_REDIS_URL unset; Redis tests did not run"
        );
    }
    url.clone()
}

fn start() -> Option<String> {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir = tempfile::tempdir().ok()?.keep();
    let mut server = spawn(port, &dir);
    let output = child::Stderr::capture(&mut server, "redis-server");
    // A watchdog stops the server when this process exits, however it exits.
    let watchdog = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill {pid}; rm -rf '{dir}'",
        me = std::process::id(),
        pid = server.id(),
        dir = dir.display()
    );
    // Never waited for: it must outlive this process (init reaps it).
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Inherited, not discarded: should the watchdog fail (say, `kill` refused), what it
        // says reaches the test run's output.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the redis-server watchdog");
    // While this process lives, the server may only die by the watchdog's hand, after it: a
    // server that exits on its own fails the run, with its output shown. Written to fd 2
    // directly (not through the test harness's capture, which an abort would discard).
    let seen = output.clone();
    std::thread::spawn(move || {
        let status = server.wait();
        std::thread::sleep(Duration::from_millis(100)); // the last lines
        let _ = writeln!(
            std::io::stderr(),
            "redis-server on port {port} exited on its own ({status:?}) during the tests; its output:\n{}",
            seen.text()
        );
        std::process::abort();
    });
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if ping(port) {
            eprintln!("redis-server of this test run on 127.0.0.1:{port}");
            return Some(format!("redis://127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "redis-server on port {port} did not answer within 10 s; its output:\n{}",
        output.text()
    );
}

/// `redis-server` on `port`, its log (which it writes to stdout) sent to a piped stderr, so
/// that `child::Stderr` keeps it. `exec`: the child's pid is the server's own.
pub fn spawn(port: u16, dir: &std::path::Path) -> std::process::Child {
    Command::new("sh")
        .args(["-c", "exec redis-server \"$@\" 1>&2", "sh"])
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start redis-server")
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
