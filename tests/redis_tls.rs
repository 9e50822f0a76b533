//! `RedisStore` over TLS (feature `redis-tls`) against `redis-server --tls-port`, started by
//! the test with a CA and a server certificate it makes itself (`openssl`): `rediss://` with
//! the private CA works (operations and pub/sub wake-ups), an untrusted server is refused with
//! a typed error, and with `--tls-auth-clients yes` only a client with a certificate gets in.
//!
//! Required under `CI=true`: `redis-server` and `openssl` must be on `PATH`.
#![cfg(all(feature = "redis-tls", not(loom)))]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use idemkv::redis::RedisStore;
use idemkv::{Begin, Error, Fingerprint, IdempotencyStore, Key};

#[path = "support/child.rs"]
mod child;
#[path = "support/redis.rs"]
mod redis_support;

const FP: Fingerprint = Fingerprint::from_bytes([5; 16]);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=idemkv test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &crt,
            ],
        );
    }
}

/// A TLS-only `redis-server` on a free port; killed when dropped.
struct TlsServer {
    port: u16,
    child: std::process::Child,
    output: child::Stderr,
}

impl TlsServer {
    fn start(dir: &Path, auth_clients: bool) -> TlsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("sh")
            .args(["-c", "exec redis-server \"$@\" 1>&2", "sh"])
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt"])
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = child::Stderr::capture(&mut child, "redis-server (tls)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "redis-server --tls-port did not listen:\n{}",
                output.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsServer {
            port,
            child,
            output,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        child::stop(&mut self.child, &self.output, "redis-server (tls)");
    }
}

/// The tools, or `None` (skipped loudly; a failure under `CI=true`).
fn setup() -> Option<tempfile::TempDir> {
    let openssl = Command::new("openssl").arg("version").output();
    if !(openssl.is_ok_and(|o| o.status.success()) && redis_support::have_redis_server()) {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true: the Redis TLS tests need redis-server and openssl on PATH"
        );
        eprintln!("SKIPPED: redis-server or openssl missing; Redis TLS tests did not run");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    Some(dir)
}

async fn round_trip(store: &RedisStore, id: &str) {
    let key = Key::new("tls", id);
    let Begin::Acquired(lease) = store.begin(key, FP, Duration::from_secs(30)).await.unwrap()
    else {
        panic!("a fresh key is acquired");
    };
    // A waiter on the TLS pub/sub connection, woken by the completion (the lease outlives
    // its wait, so only the notification can end it Completed).
    let waiter = {
        let (store, id) = (store.clone(), id.to_owned());
        tokio::spawn(async move {
            store
                .begin_wait(
                    Key::new("tls", &id),
                    FP,
                    Duration::from_secs(30),
                    Duration::from_secs(10),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .complete(&lease, b"over tls", None, &[])
        .await
        .unwrap();
    match waiter.await.unwrap().unwrap() {
        Begin::Completed(c) => assert_eq!(c.response, b"over tls"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let Some(dir) = setup() else { return };
    let server = TlsServer::start(dir.path(), false);
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let store = RedisStore::builder(server.url())
        .tls_root_cert(ca)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output.text()));
    round_trip(&store, "private-ca").await;

    // Without the CA the server's certificate is not trusted: a typed error, no panic.
    let untrusted = RedisStore::builder(server.url())
        .timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(
        matches!(untrusted, Err(Error::Unavailable { .. })),
        "{untrusted:?}"
    );
    // A plain-text client on the TLS port gets nowhere either.
    let plain = RedisStore::builder(format!("redis://127.0.0.1:{}", server.port))
        .timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let Some(dir) = setup() else { return };
    let server = TlsServer::start(dir.path(), true);
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let store = RedisStore::builder(server.url())
        .tls_root_cert(read("ca.crt"))
        .tls_client_cert(read("client.crt"), read("client.key"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", server.output.text()));
    round_trip(&store, "mtls").await;

    let anonymous = RedisStore::builder(server.url())
        .tls_root_cert(read("ca.crt"))
        .timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(
        matches!(anonymous, Err(Error::Unavailable { .. })),
        "a client without a certificate got in: {anonymous:?}"
    );
}
