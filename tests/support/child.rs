//! Child processes that a test kills: their stderr is kept, and a kill checks that the child
//! was still running until the `SIGKILL` landed. A child that exited or panicked on its own
//! fails the test with its stderr shown, so a crash test can never go on "checking" children
//! that died at their first write.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::{Arc, Mutex};

const SIGKILL: i32 = 9;

/// A child's stderr, read in the background (so it never blocks on a full pipe) and echoed
/// to ours with a prefix.
#[derive(Clone, Default)]
pub struct Stderr(Arc<Mutex<String>>);

impl Stderr {
    /// Starts reading `child`'s stderr (it must have been spawned with `Stdio::piped()`).
    pub fn capture(child: &mut Child, label: &str) -> Stderr {
        let captured = Stderr::default();
        let Some(pipe) = child.stderr.take() else {
            panic!("{label}: stderr was not piped");
        };
        let sink = Arc::clone(&captured.0);
        let label = label.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
                let mut s = sink.lock().expect("stderr lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        captured
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        self.0.lock().expect("stderr lock").clone()
    }

    /// Reads what is left of a pipe after the child is gone (for callers that read it whole).
    pub fn drain(mut pipe: impl Read) -> String {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    }
}

/// Kills `child` with `SIGKILL` and reaps it; fails the test, showing `stderr`, if the child
/// had already exited on its own (its status is then not "killed by signal 9").
pub fn sigkill(child: &mut Child, stderr: &Stderr, what: &str) {
    if let Ok(Some(status)) = child.try_wait() {
        died_on_its_own(what, status, stderr);
    }
    // If it exits between the check and the kill, the status below says so.
    let _ = child.kill();
    let status = child.wait().expect("reap the child");
    if status.signal() != Some(SIGKILL) {
        died_on_its_own(what, status, stderr);
    }
}

/// Stops `child` at the end of its use (its owner's `Drop`). A child that had already exited
/// on its own fails the test with its stderr shown; if the test is failing anyway, its stderr
/// is printed instead (a second panic would abort and hide the first).
pub fn stop(child: &mut Child, stderr: &Stderr, what: &str) {
    match child.try_wait() {
        Ok(Some(status)) if std::thread::panicking() => eprintln!(
            "{what} had exited on its own ({status}); its stderr:\n{}",
            stderr.text()
        ),
        Ok(Some(status)) => died_on_its_own(what, status, stderr),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn died_on_its_own(what: &str, status: std::process::ExitStatus, stderr: &Stderr) -> ! {
    // Give the reader a moment to collect the last lines.
    std::thread::sleep(std::time::Duration::from_millis(100));
    panic!(
        "{what} exited on its own ({status}) before it was killed; its stderr:\n{}",
        stderr.text()
    );
}
