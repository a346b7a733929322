//! What each listener reports: connections open, refused at capacity,
//! closed idle, accept failures, and whether it is accepting at all (for
//! `/readyz`). One [`ListenerStats`] per listener, gathered in a
//! [`Listeners`] set that the admin port renders.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// One listener's counters.
#[derive(Debug)]
pub struct ListenerStats {
    name: &'static str,
    open: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    accept_errors: AtomicU64,
    /// The last accept error, while the listener has not accepted since.
    failing: Mutex<Option<String>>,
    /// When a warning was last logged (so a flood logs once a second).
    last_warned: Mutex<Option<Instant>>,
}

impl ListenerStats {
    /// Counters for the listener called `name` (a metrics label).
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            failing: Mutex::new(None),
            last_warned: Mutex::new(None),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused because the listener was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed for idling.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }

    /// Accepts that failed for a reason of this process (descriptors,
    /// memory).
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }

    /// Why the listener cannot accept now, if it cannot.
    pub fn failing(&self) -> Option<String> {
        lock(&self.failing).clone()
    }

    pub(super) fn accepting(&self) {
        let mut failing = lock(&self.failing);
        if failing.is_some() {
            *failing = None;
            drop(failing);
            tracing::info!(listener = self.name, "accepting connections again");
        }
    }

    pub(super) fn accept_failed(&self, e: &std::io::Error) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.failing) = Some(e.to_string());
        if self.may_warn() {
            tracing::warn!(
                listener = self.name,
                error = %e,
                total = self.accept_errors(),
                "cannot accept connections; backing off and retrying"
            );
        }
    }

    pub(super) fn refused_at_capacity(&self, max: usize) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.may_warn() {
            tracing::warn!(
                listener = self.name,
                max_connections = max,
                total = self.refused(),
                "connection limit reached; closing new connections"
            );
        }
    }

    pub(super) fn closed_idle(&self) {
        self.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection open until the returned guard drops; the guard
    /// also holds the connection's slot under the limit.
    pub(super) fn opened(self: &Arc<Self>, slot: OwnedSemaphorePermit) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard {
            stats: Arc::clone(self),
            _slot: slot,
        }
    }

    fn may_warn(&self) -> bool {
        let mut last = lock(&self.last_warned);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// An open connection, counted until dropped.
pub struct OpenGuard {
    stats: Arc<ListenerStats>,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for OpenGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenGuard")
            .field("listener", &self.stats.name)
            .finish_non_exhaustive()
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The listeners of one process.
#[derive(Debug, Default, Clone)]
pub struct Listeners(Arc<Mutex<Vec<Arc<ListenerStats>>>>);

impl Listeners {
    /// Adds a listener's counters.
    pub fn add(&self, stats: &Arc<ListenerStats>) {
        lock(&self.0).push(Arc::clone(stats));
    }

    /// Every listener that cannot accept now, with why.
    pub fn failing(&self) -> Vec<String> {
        lock(&self.0)
            .iter()
            .filter_map(|s| {
                s.failing()
                    .map(|why| format!("the {} listener cannot accept connections: {why}", s.name))
            })
            .collect()
    }

    /// Appends the listener metrics in Prometheus text format.
    #[expect(
        clippy::cast_precision_loss,
        reason = "gauges and counters are floats in the exposition format"
    )]
    pub fn render(&self, out: &mut String) {
        let all = lock(&self.0).clone();
        let series = |value: &dyn Fn(&ListenerStats) -> f64| -> Vec<(Vec<String>, f64)> {
            all.iter()
                .map(|s| (vec![s.name.to_owned()], value(s)))
                .collect()
        };
        use crate::metrics::{render_counter, render_gauge};
        render_gauge(
            out,
            "tally_listener_connections",
            "Connections open now, per listener.",
            &["listener"],
            &series(&|s| s.open() as f64),
        );
        render_gauge(
            out,
            "tally_listener_accepting",
            "1 while the listener accepts connections; 0 while accepting fails (out of descriptors or memory).",
            &["listener"],
            &series(&|s| if s.failing().is_some() { 0.0 } else { 1.0 }),
        );
        render_counter(
            out,
            "tally_listener_accept_errors_total",
            "Accepts that failed for a reason of this process (descriptors, memory).",
            &["listener"],
            &series(&|s| s.accept_errors() as f64),
        );
        render_counter(
            out,
            "tally_listener_refused_total",
            "Connections closed at once because the listener was at its connection limit.",
            &["listener"],
            &series(&|s| s.refused() as f64),
        );
        render_counter(
            out,
            "tally_listener_idle_closed_total",
            "Connections closed for sending no request within the header or idle timeout.",
            &["listener"],
            &series(&|s| s.idle_closed() as f64),
        );
    }
}
