//! A TCP forwarder for tests that need the network to fail: cut every
//! connection to the broker (a partition), heal, or point it at a broker
//! restarted on another port.

use std::sync::Arc;

/// A TCP forwarder to `target` that can cut every connection and refuse
/// new ones (a network partition), then let them through again.
pub struct Partition {
    pub addr: std::net::SocketAddr,
    target: Arc<std::sync::Mutex<std::net::SocketAddr>>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Connections dropped while cut.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
    open: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Partition {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let target = Arc::new(std::sync::Mutex::new(target));
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, o, t, d) = (
            Arc::clone(&cut),
            Arc::clone(&open),
            Arc::clone(&target),
            Arc::clone(&dropped),
        );
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    continue; // dropped: connection reset
                }
                let target = *t.lock().unwrap();
                o.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                }));
            }
        });
        Self {
            addr,
            target,
            cut,
            dropped,
            open,
        }
    }

    /// Sends new connections to `target` (the broker restarted elsewhere).
    pub fn retarget(&self, target: std::net::SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for conn in self.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
