//! A Redis server for the tests, so that one `cargo test --features redis` covers the Redis
//! backend: `IDEMKV_REDIS_URL` if it is set; otherwise a `redis-server` of this test process's
//! own, on a free loopback port, when one is on `PATH` (started once per test binary, and
//! stopped by a watchdog when this process exits, however it exits; a server that exits on its
//! own before that aborts the run with its output shown); otherwise `None`, said
//! loudly on stderr — and a failure under `CI=true`, where a skipped backend would be a blind
//! test.
#![allow(dead_code, clippy::unwrap_used)]

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

/// Whether `redis-server` runs from `PATH`.
pub fn have_redis_server() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn start() -> Option<String> {
    if !have_redis_server() {
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
    watchdog(&[server.id()], "", &dir);
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

/// A watchdog that kills `pids` (with `kill {signal}`) and removes `dir` when this process
/// exits, however it exits.
fn watchdog(pids: &[u32], signal: &str, dir: &std::path::Path) {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill {signal} {pids} 2>/dev/null; rm -rf '{dir}'",
        me = std::process::id(),
        pids = pids.join(" "),
        dir = dir.display()
    );
    // Never waited for: it must outlive this process (init reaps it).
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Inherited, not discarded: should the watchdog fail, what it says reaches the test
        // run's output.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the redis-server watchdog");
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

/// A Redis Cluster of the caller's own on loopback: `masters` masters with one replica each,
/// `redis-server --cluster-enabled yes` on free ports, joined by `redis-cli --cluster create`.
/// Stopped when dropped, and by a watchdog if this process dies first. `None` (loudly, and a
/// failure under `CI=true`) when `redis-server` is not on `PATH`.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    dir: std::path::PathBuf,
}

/// One server of a [`Cluster`].
pub struct ClusterNode {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    output: child::Stderr,
}

impl Cluster {
    pub fn start(masters: usize) -> Option<Cluster> {
        if !have_redis_server() {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI=true: the Redis Cluster tests need redis-server on PATH"
            );
            eprintln!("SKIPPED: no redis-server on PATH; Redis Cluster tests did not run");
            return None;
        }
        let dir = tempfile::tempdir().expect("a cluster directory").keep();
        let mut nodes = Vec::new();
        for i in 0..masters * 2 {
            let port = cluster_port();
            let node_dir = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let (c, output) = spawn_cluster_node(port, &node_dir);
            nodes.push(ClusterNode {
                port,
                dir: node_dir,
                child: Some(c),
                output,
            });
        }
        let pids: Vec<u32> = nodes
            .iter()
            .map(|n| n.child.as_ref().unwrap().id())
            .collect();
        // SIGKILL: a node the test killed and restarted has a new pid (`Drop` stops it).
        watchdog(&pids, "-9", &dir);
        let cluster = Cluster { nodes, dir };
        let until = Instant::now() + Duration::from_secs(10);
        while !cluster.nodes.iter().all(|n| ping(n.port)) {
            assert!(
                Instant::now() < until,
                "cluster nodes did not answer within 10 s:\n{}",
                cluster.outputs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(Duration::from_secs(20));
        eprintln!("Redis Cluster of this test on 127.0.0.1: {addrs:?}");
        Some(cluster)
    }

    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// `redis-cli -p port args…`, its stdout.
    pub fn cli(port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every live node says `cluster_state:ok`, sees only live nodes as the
    /// masters of slots (after a kill: the failover is over), and has its replica in sync.
    pub fn wait_ok(&self, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let live: Vec<u16> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| n.port)
                .collect();
            // Every node sees the cluster whole, and every master with a replica has it in
            // sync (else the first `WAIT` would wait for the initial transfer).
            let ok = live.iter().all(|p| {
                Self::cli(*p, &["cluster", "info"]).contains("cluster_state:ok")
                    && slot_masters(&Self::cli(*p, &["cluster", "nodes"]))
                        .iter()
                        .all(|m| live.contains(m))
                    && {
                        let repl = Self::cli(*p, &["info", "replication"]);
                        !repl.contains("role:master")
                            || repl.contains("connected_slaves:0")
                            || repl.contains("state=online")
                    }
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < until,
                "the cluster did not reach cluster_state:ok within {within:?}:\n{}",
                self.outputs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the master that owns `key`'s slot (as the server computes it).
    pub fn master_of(&self, key: &[u8]) -> u16 {
        let live = self.nodes.iter().find(|n| n.child.is_some()).unwrap().port;
        let slot: u16 = Self::cli(live, &["cluster", "keyslot", &String::from_utf8_lossy(key)])
            .trim()
            .parse()
            .unwrap();
        let nodes = Self::cli(live, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) else {
                    continue;
                };
                if (a..=b).contains(&slot) {
                    let hostport = f[1].split('@').next().unwrap();
                    return hostport.rsplit_once(':').unwrap().1.parse().unwrap();
                }
            }
        }
        panic!("no master owns slot {slot}:\n{nodes}");
    }

    /// SIGKILLs the server on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        let mut c = node.child.take().expect("a live node");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Starts the server on `port` again, from its directory (its `nodes.conf`): it rejoins
    /// the cluster, as a replica if its slots moved meanwhile. Not covered by the watchdog
    /// (its pid is new); `Drop` stops it.
    pub fn restart(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        assert!(node.child.is_none(), "node :{port} is running");
        let (c, output) = spawn_cluster_node(port, &node.dir);
        node.child = Some(c);
        node.output = output;
    }

    /// Every node's log, for a failure message.
    pub fn outputs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- :{} ---\n{}", n.port, n.output.text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    /// Stops every node the test did not kill; one that died on its own fails the test with
    /// its log.
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                child::stop(&mut c, &n.output, &format!("redis-server :{}", n.port));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster-enabled `redis-server` on `port` in `dir`, its log captured.
fn spawn_cluster_node(port: u16, dir: &std::path::Path) -> (std::process::Child, child::Stderr) {
    let mut c = Command::new("sh")
        .args(["-c", "exec redis-server \"$@\" 1>&2", "sh"])
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
        .args(["--cluster-config-file", "nodes.conf", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start redis-server");
    let output = child::Stderr::capture(&mut c, &format!("redis-server :{port}"));
    (c, output)
}

/// The ports of the masters that own slots, in `CLUSTER NODES` output.
fn slot_masters(nodes: &str) -> Vec<u16> {
    nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") {
                return None;
            }
            let hostport = f[1].split('@').next()?;
            hostport.rsplit_once(':')?.1.parse().ok()
        })
        .collect()
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// One cluster shared by the tests of this binary that only read and write (never kill).
pub fn shared_cluster() -> Option<Vec<String>> {
    static URLS: OnceLock<Option<Vec<String>>> = OnceLock::new();
    URLS.get_or_init(|| {
        let mut c = Cluster::start(3)?;
        let urls = c.urls();
        // Lives as long as the process (the watchdog stops it). Meanwhile a node may only die
        // by the watchdog's hand: one that exits on its own aborts the run with its log, as
        // the single server does.
        std::thread::spawn(move || {
            loop {
                for n in &mut c.nodes {
                    if let Some(Ok(Some(status))) = n.child.as_mut().map(|c| c.try_wait()) {
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = writeln!(
                            std::io::stderr(),
                            "redis-server :{} of the shared cluster exited on its own ({status}); its output:\n{}",
                            n.port,
                            n.output.text()
                        );
                        std::process::abort();
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Some(urls)
    })
    .clone()
}

/// The reason `connect` gives for refusing `builder`'s server as one that may evict keys;
/// fails the test if it is accepted or refused otherwise, or if `allow_eviction(true)` does
/// not then connect it.
#[cfg(feature = "redis")]
pub async fn refused_for_eviction(builder: idemkv::redis::RedisStoreBuilder, what: &str) -> String {
    let reason = match builder.clone().connect().await {
        Err(idemkv::Error::InvalidConfig { reason }) => reason,
        Err(e) => panic!("{what}: expected InvalidConfig, got {e:?}"),
        Ok(_) => panic!("{what}: a server that may evict keys was accepted"),
    };
    builder.allow_eviction(true).connect().await.unwrap();
    reason
}
