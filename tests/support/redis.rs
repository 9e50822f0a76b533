//! A Redis server for the tests, so that one `cargo test --features redis` covers the Redis
//! backend: `IDEMKV_REDIS_URL` if it is set; otherwise a `redis-server` of this test process's
//! own, on a free loopback port, when one is on `PATH` (started once per test binary, and
//! stopped by a watchdog when this process exits, however it exits); otherwise `None`, said
//! loudly on stderr — and a failure under `CI=true`, where a skipped backend would be a blind
//! test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
    // The watchdog shell starts the server, then waits for this process to go and stops it.
    let script = format!(
        "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir '{dir}' \
         --logfile '{dir}/redis.log' & r=$!; \
         while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill $r; rm -rf '{dir}'",
        dir = dir.display(),
        me = std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if ping(port) {
            eprintln!("redis-server of this test run on 127.0.0.1:{port}");
            return Some(format!("redis://127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server on port {port} did not answer within 10 s");
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
