//! Child processes with bounded waits: a regression that keeps a process
//! from printing a line or from exiting fails the test with what it did
//! print, instead of hanging CI.

use std::io::BufRead as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a child may take to print a line it is expected to print or
/// to exit when told. A debug build on a loaded 2-core machine starts in
/// well under 5 s; the bound leaves six times that.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Lines a child writes to one of its pipes, read on a thread so that
/// every wait for one has a bound.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    /// Everything read so far, for the failure message.
    seen: Vec<String>,
}

impl Lines {
    /// Starts reading `pipe` (a child's stdout or stderr).
    pub fn of(pipe: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line, waiting at most `limit`.
    ///
    /// # Panics
    /// When no line comes in time or the pipe closes.
    pub fn next_within(&mut self, limit: Duration) -> String {
        self.try_next_within(limit)
            .unwrap_or_else(|e| panic!("no line within {limit:?} ({e}); so far: {:#?}", self.seen))
    }

    /// The same, saying why there is none instead of panicking.
    ///
    /// # Errors
    /// The pipe closed, or `limit` passed.
    pub fn try_next_within(&mut self, limit: Duration) -> Result<String, mpsc::RecvTimeoutError> {
        let line = self.rx.recv_timeout(limit)?;
        self.seen.push(line.clone());
        Ok(line)
    }

    /// Reads until a line contains `needle`, for at most `limit` in all.
    ///
    /// # Panics
    /// When no such line comes in time.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line containing {needle:?} within {limit:?} ({e}); so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Every line until the pipe closes, waiting at most `limit` in all.
    ///
    /// # Panics
    /// When the pipe stays open past `limit`.
    pub fn rest(&mut self, limit: Duration) -> Vec<String> {
        let until = Instant::now() + limit;
        let mut rest = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    rest.push(line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return rest,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the pipe was still open after {limit:?}; so far: {rest:#?}")
                }
            }
        }
    }
}

/// Waits at most `limit` for `child` to exit.
///
/// # Panics
/// When it is still running then (it is killed first, so nothing is left
/// behind).
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} still running after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `child`.
pub fn terminate(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {} failed", child.id());
}

/// Runs `command` to the end, as `Command::output` does, but for at most
/// `limit`: a client that hangs on a broker fails the test.
///
/// # Panics
/// When it runs longer (it is killed first).
pub fn output_within(command: &mut std::process::Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish_within(child, limit)
}

/// Collects a started child's piped stdout and stderr and its exit, as
/// `Child::wait_with_output` does, for at most `limit`.
///
/// # Panics
/// When it runs longer (it is killed first).
pub fn finish_within(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    use std::io::Read as _;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_exit(&mut child, limit);
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}
