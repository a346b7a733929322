//! Catching the audit JSON-lines file up with the store at start-up.
//!
//! The file is a copy of the store's log for log shippers, appended after
//! each commit. A crash between a commit and its append leaves the file
//! short of records the store holds (and were acknowledged), or ends it
//! in a half-written line; the next start would then append after a gap,
//! and `tally ctl audit verify --file` would report records missing. So
//! before it appends anything new, the broker drops a half-written last
//! line and appends every stored record after the file's last one.
//!
//! A missing or empty file starts at the next record, as before: a new
//! file for an existing store is not back-filled.

use crate::audit::MAX_LINE;
use crate::store::{Store, StoreError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

/// Records appended per store query.
const PAGE: u32 = 1000;

/// Why the file could not be caught up.
#[derive(Debug, thiserror::Error)]
pub(super) enum CatchUpError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file's last complete line is not an audit record.
    #[error("its last line is not an audit record")]
    NotAudit,
}

/// Brings the file at `path` up to the store's last record; returns how
/// many records it appended.
///
/// # Errors
/// [`CatchUpError`]: the file is left as it was found, or with a
/// half-written last line dropped and some records appended.
pub(super) async fn catch_up(path: &Path, store: &Store) -> Result<u64, CatchUpError> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let Some(last) = last_seq(&mut file)? else {
        return Ok(0);
    };
    file.seek(SeekFrom::End(0))?;
    let mut appended = 0;
    let mut after = last;
    loop {
        let records = store.audit_after(after, PAGE).await?;
        let Some(end) = records.last() else { break };
        after = end.seq;
        let mut buf = String::new();
        for record in &records {
            buf.push_str(&record.line);
            buf.push('\n');
        }
        file.write_all(buf.as_bytes())?;
        appended += records.len() as u64;
    }
    if appended > 0 {
        file.sync_data()?;
        tracing::warn!(
            after = last,
            appended,
            "the audit file ended before the store's log (the broker stopped between a commit and its copy); appended the missing records"
        );
    }
    Ok(appended)
}

/// The `seq` of the file's last complete line (`None` for an empty file),
/// after cutting off a last line that has no newline.
fn last_seq(file: &mut std::fs::File) -> Result<Option<u64>, CatchUpError> {
    let len = file.seek(SeekFrom::End(0))?;
    // A record line is at most MAX_LINE bytes: the last complete one
    // starts within this much of the end.
    let from = len.saturating_sub(2 * MAX_LINE as u64 + 2);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if from == 0 => 0,
        None => return Err(CatchUpError::NotAudit),
    };
    if complete < tail.len() {
        // Cut short by the crash; the store has the whole record.
        file.set_len(from + complete as u64)?;
        tail.truncate(complete);
    }
    let Some(body) = tail.strip_suffix(b"\n") else {
        return Ok(None);
    };
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &body[i + 1..],
        None if from == 0 => body,
        None => return Err(CatchUpError::NotAudit),
    };
    let record: serde_json::Value =
        serde_json::from_slice(line).map_err(|_| CatchUpError::NotAudit)?;
    record["seq"]
        .as_u64()
        .map(Some)
        .ok_or(CatchUpError::NotAudit)
}

/// Opens the audit JSON-lines file for appending (0600, created if
/// missing).
pub(super) fn open_audit_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Appends audit lines to the file as they come, as many per write as
/// have queued. The store holds the authoritative copy; a failing file is
/// logged, not fatal.
pub(super) async fn append_audit_lines(
    mut file: std::fs::File,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use std::io::Write as _;
    let mut buf = String::new();
    while let Some(line) = lines.recv().await {
        buf.clear();
        buf.push_str(&line);
        buf.push('\n');
        while buf.len() < 1 << 20 {
            match lines.try_recv() {
                Ok(more) => {
                    buf.push_str(&more);
                    buf.push('\n');
                }
                Err(_) => break,
            }
        }
        if let Err(e) = file.write_all(buf.as_bytes()) {
            tracing::error!(error = %e, "appending to the audit file failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, text).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, file)
    }

    #[test]
    fn the_last_complete_record_names_where_the_file_ends() {
        let (_dir, mut file) = file_with("{\"seq\":1}\n{\"seq\":2}\n");
        assert_eq!(last_seq(&mut file).unwrap(), Some(2));
        let (_dir, mut file) = file_with("");
        assert_eq!(last_seq(&mut file).unwrap(), None);
    }

    #[test]
    fn a_half_written_last_line_is_cut_off() {
        let (_dir, mut file) = file_with("{\"seq\":1}\n{\"seq\":2}\n{\"seq\":3,\"ki");
        assert_eq!(last_seq(&mut file).unwrap(), Some(2));
        assert_eq!(file.metadata().unwrap().len(), 20);
    }

    #[test]
    fn a_file_that_is_not_an_audit_log_is_left_alone() {
        let (_dir, mut file) = file_with("hello\n");
        assert!(matches!(last_seq(&mut file), Err(CatchUpError::NotAudit)));
        assert_eq!(file.metadata().unwrap().len(), 6);
    }
}
