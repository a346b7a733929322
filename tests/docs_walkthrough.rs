//! The README's walk-throughs and every runbook in docs/OPERATIONS.md run
//! as written, in order, in one shell, against the built binary on
//! loopback: the broker, two sidecars and the demo's payments app they
//! start, the curl calls, every `tally ctl` command of every runbook.
//!
//! Every ```` ```sh ```` block is run, unless the line before it is
//! `<!-- walkthrough: skip (why) -->` (`cargo test` itself, the load
//! tests). A command whose last line ends in `# exit N` must exit N; every
//! other command must succeed (`set -euo pipefail`). A failure names the
//! document and line of the command that failed, with the output so far.
//!
//! The walk-through uses the README's fixed ports (8443, 8444, 9090,
//! 8080, 15001, 15006, 15020, 15021), so it needs them free; they are
//! below the ephemeral range the other tests' `127.0.0.1:0` binds use.
//! It needs `bash` and `curl`, as the README does.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The documents, in the order a newcomer reads them.
const DOCS: &[&str] = &["README.md", "docs/OPERATIONS.md"];

/// How long the whole walk-through may take (it takes ~20 s; most of it
/// is the sidecars' reconnects after the broker restart and the denial).
const LIMIT: Duration = Duration::from_secs(240);

/// One shell command of a document: its text (continuation lines joined
/// as written), where it starts, and the exit status it must have.
#[derive(Debug, PartialEq)]
struct Step {
    doc: String,
    line: usize,
    text: String,
    exit: i32,
}

/// The runnable commands of `markdown` (named `doc` in messages).
fn steps(doc: &str, markdown: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut in_block = false;
    let mut skip = false;
    let mut previous = "";
    let mut pending: Option<Step> = None;
    for (index, line) in markdown.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim_end();
        if !in_block {
            if trimmed.starts_with("```") {
                in_block = true;
                skip = trimmed != "```sh" || previous.starts_with("<!-- walkthrough: skip");
            }
            if !trimmed.is_empty() {
                previous = trimmed;
            }
            continue;
        }
        if trimmed == "```" {
            assert!(
                pending.is_none(),
                "{doc}:{number}: a command ends in `\\` at the end of its block"
            );
            in_block = false;
            previous = trimmed;
            continue;
        }
        if skip {
            continue;
        }
        let step = pending.get_or_insert_with(|| Step {
            doc: doc.to_owned(),
            line: number,
            text: String::new(),
            exit: 0,
        });
        if let Some(continued) = trimmed.strip_suffix('\\') {
            step.text.push_str(continued);
            step.text.push_str("\\\n");
            continue;
        }
        let (command, exit) = expected_exit(trimmed);
        step.text.push_str(command);
        step.exit = exit;
        let step = pending.take().expect("inserted above");
        if !step.text.trim_start().starts_with('#') && !step.text.trim().is_empty() {
            steps.push(step);
        }
    }
    assert!(!in_block, "{doc}: a code block is not closed");
    steps
}

/// A trailing `# exit N` comment says what status the command must have.
fn expected_exit(line: &str) -> (&str, i32) {
    if let Some((command, comment)) = line.rsplit_once("# exit ") {
        let code = comment
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|digits| digits.parse().ok());
        if let Some(code) = code {
            return (command.trim_end(), code);
        }
    }
    (line, 0)
}

/// The bash script that runs `steps`: each command announced on stderr
/// with its place, checked for its exit status.
fn script(steps: &[Step]) -> String {
    let mut out = String::from(
        "exec 2>&1\nset -euo pipefail\n\
         trap 'jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null' EXIT\n",
    );
    for step in steps {
        let place = format!("{}:{}", step.doc, step.line);
        out.push_str(&format!("echo '--- {place}' >&2\n"));
        if step.exit == 0 {
            out.push_str(&format!(
                "{}\n",
                step.text
                    .trim_end_matches(|c: char| c == ';' || c.is_whitespace())
            ));
        } else {
            out.push_str(&format!(
                "set +e\n{}\nstatus=$?\nset -e\n\
                 if [ \"$status\" -ne {code} ]; then echo \"walkthrough: {place}: exit $status, the document says {code}\" >&2; exit 100; fi\n",
                step.text,
                code = step.exit
            ));
        }
    }
    out.push_str("echo '--- walkthrough done' >&2\n");
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory with what a fresh checkout gives the walk-through
/// (the fixtures the README names), and nothing else.
fn checkout_like() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixtures = dir.path().join("tests/fixtures");
    std::fs::create_dir_all(&fixtures).expect("fixtures dir");
    std::fs::copy(
        repo().join("tests/fixtures/policy.yaml"),
        fixtures.join("policy.yaml"),
    )
    .expect("copying the policy fixture");
    dir
}

fn run_script(dir: &Path, script: &str) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt as _;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tally"));
    let path = format!(
        "{}:{}",
        bin.parent().expect("the binary's directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::fs::write(dir.join("walkthrough.sh"), script).expect("writing the script");
    let mut command = Command::new("bash");
    command
        .arg("walkthrough.sh")
        .current_dir(dir)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group, so the parts it starts end with it.
        .process_group(0);
    let mut child = command.spawn().expect("bash runs");
    let group = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    let transcript = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let transcript = std::sync::Arc::clone(&transcript);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                transcript
                    .lock()
                    .expect("not poisoned")
                    .extend_from_slice(&buf[..n]);
            }
        })
    };
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait().ok().and_then(|s| s.code()));
    });
    let status = finished.recv_timeout(LIMIT).ok().flatten();
    // Whatever is left of the group (a part the script did not stop).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let _ = reader.join();
    let text = String::from_utf8_lossy(&transcript.lock().expect("not poisoned")).into_owned();
    (status, text)
}

#[test]
fn every_walkthrough_and_runbook_command_runs_as_written() {
    let mut all = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(repo().join(doc)).expect("reading the doc");
        all.extend(steps(doc, &text));
    }
    assert!(all.len() > 50, "only {} commands found", all.len());
    let dir = checkout_like();
    let (status, transcript) = run_script(dir.path(), &script(&all));
    assert_eq!(
        status,
        Some(0),
        "the walk-through stopped (exit {status:?}); transcript:\n{transcript}"
    );
    // Shown with --nocapture, to read what a newcomer would see.
    println!("{transcript}");
}

#[test]
fn steps_join_continuations_and_read_expected_exits() {
    let doc = "text\n```sh\n# comment\ntally a \\\n  --b c   # exit 1\ntally d\n```\n\
               <!-- walkthrough: skip (slow) -->\n```sh\ncargo test\n```\n```console\n$ x\n```\n";
    let found = steps("D.md", doc);
    assert_eq!(
        found,
        vec![
            Step {
                doc: "D.md".into(),
                line: 4,
                text: "tally a \\\n  --b c".into(),
                exit: 1
            },
            Step {
                doc: "D.md".into(),
                line: 6,
                text: "tally d".into(),
                exit: 0
            },
        ]
    );
}
