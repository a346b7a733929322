//! Verification failures at the inbound proxy, for the broker's audit log:
//! summarized per interval so a flood costs a bounded number of records.
//!
//! Within an interval each distinct (reason, caller, method, path, token)
//! is one record with a count; past [`MAX_RECORDS`] distinct keys, further
//! failures are only counted by reason. A reporter task sends each
//! interval's summary to the broker; undeliverable summaries are merged
//! into the next (same bound), so nothing is dropped and memory stays
//! bounded.

use crate::proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// Distinct records per interval.
pub const MAX_RECORDS: usize = 64;
/// How often a summary is sent.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Longest path, jti or caller kept.
const MAX_FIELD: usize = 256;

/// One refused request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Failure {
    /// Why (the inbound metrics' reason).
    pub reason: &'static str,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The token's claimed jti.
    pub jti: String,
    /// The token's claimed sub.
    pub claimed_sub: String,
}

impl Failure {
    /// A failure, with every text field cut to 256 printable characters.
    pub fn new(reason: &'static str, method: &str, path: &str, token: Option<&str>) -> Self {
        let (jti, sub) = token.map(claimed).unwrap_or_default();
        let clean = |s: &str| -> String {
            s.chars()
                .filter(|c| !c.is_control())
                .take(MAX_FIELD)
                .collect()
        };
        Self {
            reason,
            method: clean(method),
            path: clean(path),
            jti: clean(&jti),
            claimed_sub: clean(&sub),
        }
    }
}

/// The jti and sub a token claims, read with the JWS parser's limits but
/// without checking the signature.
fn claimed(token: &str) -> (String, String) {
    use crate::jose::jws::{Jws, Limits};
    let Ok(jws) = Jws::parse(token, &Limits::default()) else {
        return Default::default();
    };
    let text = |k: &str| {
        jws.payload()
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    (text("jti"), text("sub"))
}

#[derive(Debug, Default)]
struct Window {
    records: HashMap<Failure, (u64, u64, u64)>,
    overflow: BTreeMap<&'static str, u64>,
}

/// The failures of the current interval.
#[derive(Debug, Default)]
pub struct FailureLog {
    window: Mutex<Window>,
}

impl FailureLog {
    /// Counts a failure at `now` (Unix seconds).
    pub fn note(&self, failure: Failure, now: u64) {
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = w.records.len() >= MAX_RECORDS;
        match w.records.get_mut(&failure) {
            Some((count, _, last)) => {
                *count += 1;
                *last = now;
            }
            None if full => *w.overflow.entry(failure.reason).or_insert(0) += 1,
            None => {
                w.records.insert(failure, (1, now, now));
            }
        }
    }

    /// The interval's summary (`None` if nothing failed), starting a new
    /// interval.
    pub fn take(&self) -> Option<pb::FailureReport> {
        let w = std::mem::take(
            &mut *self
                .window
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if w.records.is_empty() && w.overflow.is_empty() {
            return None;
        }
        let time = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        let mut records: Vec<pb::FailureRecord> = w
            .records
            .into_iter()
            .map(|(f, (count, first, last))| pb::FailureRecord {
                reason: f.reason.to_owned(),
                method: f.method,
                path: f.path,
                jti: f.jti,
                claimed_sub: f.claimed_sub,
                count,
                first_at: time(first),
                last_at: time(last),
            })
            .collect();
        records.sort_by_key(|r| r.first_at);
        Some(pb::FailureReport {
            records,
            overflow: w
                .overflow
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        })
    }
}

/// Folds `newer` into `older`: one record per key with counts summed; past
/// [`MAX_RECORDS`] keys, the newest records are counted by reason only.
pub fn merge(older: pb::FailureReport, newer: pb::FailureReport) -> pb::FailureReport {
    type Key = (String, String, String, String, String);
    let mut by_key: BTreeMap<Key, pb::FailureRecord> = BTreeMap::new();
    let mut overflow = older.overflow;
    for (reason, n) in newer.overflow {
        *overflow.entry(reason).or_insert(0) += n;
    }
    let mut records = older.records;
    records.extend(newer.records);
    for r in records {
        let key = (
            r.reason.clone(),
            r.method.clone(),
            r.path.clone(),
            r.jti.clone(),
            r.claimed_sub.clone(),
        );
        let full = by_key.len() >= MAX_RECORDS;
        match by_key.get_mut(&key) {
            Some(kept) => {
                kept.count += r.count;
                kept.first_at = kept.first_at.min(r.first_at);
                kept.last_at = kept.last_at.max(r.last_at);
            }
            None if full => {
                *overflow.entry(r.reason).or_insert(0) += r.count;
            }
            None => {
                by_key.insert(key, r);
            }
        }
    }
    let mut records: Vec<pb::FailureRecord> = by_key.into_values().collect();
    records.sort_by_key(|r| r.first_at);
    pb::FailureReport { records, overflow }
}

/// Every `every`, sends the interval's summary to the broker over the
/// channel `channel` gives (the sidecar's current mTLS channel), until the
/// log is dropped or `stop` turns true (then once more, for the last
/// interval). While the broker cannot take it, summaries are merged into
/// one pending summary, so an outage costs memory for at most
/// [`MAX_RECORDS`] records and is delivered as one report.
pub async fn report(
    log: std::sync::Weak<FailureLog>,
    every: Duration,
    channel: impl Fn() -> tonic::transport::Channel + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut pending: Option<pb::FailureReport> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = false;
    while !last {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => last = true,
        }
        let Some(log) = log.upgrade() else {
            return;
        };
        if let Some(summary) = log.take() {
            pending = Some(match pending.take() {
                Some(older) => merge(older, summary),
                None => summary,
            });
        }
        drop(log);
        let Some(summary) = &pending else {
            continue;
        };
        let mut request = tonic::Request::new(summary.clone());
        request.set_timeout(Duration::from_secs(5));
        match pb::reports_client::ReportsClient::new(channel())
            .verification_failures(request)
            .await
        {
            Ok(_) => pending = None,
            Err(status) => {
                tracing::debug!(code = ?status.code(), "verification failures not delivered; retrying with the next interval");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token-shaped JWS (its signature is not checked here).
    fn token(jti: &str, sub: &str) -> String {
        let header = crate::jose::jws::encode_header(&serde_json::json!({"alg": "ES256"}));
        let payload = crate::jose::b64::encode(
            serde_json::json!({"jti": jti, "sub": sub})
                .to_string()
                .as_bytes(),
        );
        let signature = crate::jose::b64::encode([7u8; 64]);
        format!("{header}.{payload}.{signature}")
    }

    #[test]
    fn repeats_are_counted_in_one_record() {
        let log = FailureLog::default();
        let t = token("j1", "spiffe://td/thief");
        for at in 100..110 {
            log.note(
                Failure::new("invalid_dpop_proof", "POST", "/v1/charges", Some(&t)),
                at,
            );
        }
        log.note(Failure::new("no_credentials", "GET", "/", None), 105);
        let report = log.take().unwrap();
        assert_eq!(report.records.len(), 2);
        let r = &report.records[0];
        assert_eq!((r.count, r.first_at, r.last_at), (10, 100, 109));
        assert_eq!(
            (r.jti.as_str(), r.claimed_sub.as_str()),
            ("j1", "spiffe://td/thief")
        );
        assert!(log.take().is_none(), "a new interval starts empty");
    }

    #[test]
    fn a_flood_of_distinct_failures_is_bounded() {
        let log = FailureLog::default();
        for i in 0..100_000 {
            log.note(
                Failure::new("invalid_token", "GET", &format!("/p/{i}"), None),
                1,
            );
        }
        let report = log.take().unwrap();
        assert_eq!(report.records.len(), MAX_RECORDS);
        assert_eq!(
            report.overflow["invalid_token"],
            100_000 - MAX_RECORDS as u64
        );
    }

    #[test]
    fn undelivered_summaries_merge_into_one_within_the_bound() {
        let log = FailureLog::default();
        log.note(Failure::new("revoked", "GET", "/a", None), 10);
        let first = log.take().unwrap();
        log.note(Failure::new("revoked", "GET", "/a", None), 20);
        for i in 0..100 {
            log.note(
                Failure::new("invalid_token", "GET", &format!("/{i}"), None),
                20,
            );
        }
        let merged = merge(first, log.take().unwrap());
        assert_eq!(merged.records.len(), MAX_RECORDS);
        let a = merged.records.iter().find(|r| r.path == "/a").unwrap();
        assert_eq!((a.count, a.first_at, a.last_at), (2, 10, 20));
        let total: u64 = merged.records.iter().map(|r| r.count).sum::<u64>()
            + merged.overflow.values().sum::<u64>();
        assert_eq!(total, 102, "nothing is lost in the merge");
    }

    #[test]
    fn hostile_fields_are_cut_and_cleaned() {
        let long = "x".repeat(10_000);
        let f = Failure::new(
            "bad_request",
            "GET\r\n",
            &format!("/{long}\n"),
            Some("not.a-token"),
        );
        assert_eq!(f.method, "GET");
        assert_eq!(f.path.len(), MAX_FIELD);
        assert!(f.jti.is_empty() && f.claimed_sub.is_empty());
        let long_jti = token(&"j".repeat(1_000), "s");
        assert_eq!(
            Failure::new("x", "GET", "/", Some(&long_jti)).jti.len(),
            MAX_FIELD
        );
        // A token past 8 KiB is not read at all.
        let huge = token(&long, "s");
        assert!(Failure::new("x", "GET", "/", Some(&huge)).jti.is_empty());
    }
}
