//! The `kafka_orders` example as a process of a test: built once per test binary (with the
//! Redis backend when the tests have it, so every binary builds the same example), its stdout
//! kept (the "created order … (key …)" lines say which keys ran in it), its stderr captured.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::child;

/// The example binary, built now so it is never stale.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary");
        let dir = exe.parent().and_then(Path::parent).expect("target dir");
        let features = if cfg!(feature = "redis") {
            "kafka,redis"
        } else {
            "kafka"
        };
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--features", features, "--example", "kafka_orders"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        assert!(cargo.status().expect("cargo build").success());
        dir.join("examples").join("kafka_orders")
    })
    .clone()
}

/// One running `kafka_orders`.
pub struct Orders {
    pub name: String,
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    pub stderr: child::Stderr,
}

impl Orders {
    /// Starts it with `args` and waits until it consumes.
    pub fn start(name: &str, args: &[&str]) -> Orders {
        let mut c = Command::new(binary())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kafka_orders");
        let stderr = child::Stderr::capture(&mut c, name);
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        let out = BufReader::new(c.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut o = Orders {
            name: name.to_owned(),
            child: c,
            lines,
            stderr,
        };
        o.wait_for_line("consuming ");
        o
    }

    /// The first stdout line starting with `prefix`, waited for (30 s). Fails, with the
    /// stderr, if the process exits without printing it.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        let mut exited = None;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l.clone();
            }
            if let Some(status) = exited {
                panic!(
                    "{} exited ({status}) without a line starting with {prefix:?}; stderr:\n{}",
                    self.name,
                    self.stderr.text()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its last lines may still be in the pipe: one more look.
                std::thread::sleep(Duration::from_millis(100));
                exited = Some(status);
                continue;
            }
            assert!(
                Instant::now() < until,
                "{}: no line starting with {prefix:?}; stderr:\n{}",
                self.name,
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The keys whose handler ran in this process.
    pub fn created(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("created order "))
            .map(|l| {
                l.rsplit("(key ")
                    .next()
                    .unwrap()
                    .trim_end_matches(')')
                    .to_owned()
            })
            .collect()
    }

    /// SIGKILL, checked: the process must have been running until then.
    pub fn kill(&mut self) {
        let what = self.name.clone();
        child::sigkill(&mut self.child, &self.stderr, &what);
    }

    /// SIGTERM: a graceful stop (not waited for).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {}", self.name);
    }
}

impl Drop for Orders {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
