//! Listeners under hostile connections: clients that connect and send
//! nothing, only an HTTP/2 preface, a request head one byte at a time, or
//! hold a keep-alive connection open; more connections than the limit; and
//! a process out of file descriptors. The listener must stay up, serve real
//! requests, close the idle ones within their timeouts, and say so in
//! `/readyz` and `/metrics`.

mod support;

use std::io::BufRead as _;
use std::time::{Duration, Instant};
use support::broker::Spawned;
use support::mesh::{App, Mesh, PAYMENTS, Parts, send};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits (at most `limit`) for the server to close `tcp`; how long it took.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

fn limits(header: u64, idle: u64, max: usize) -> tally::http::Limits {
    tally::http::Limits {
        header_timeout: Duration::from_secs(header),
        idle_timeout: Duration::from_secs(idle),
        max_connections: max,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_excess_connections_are_closed_and_real_ones_served() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                admin: true,
                limits: Some(limits(3, 2, 8)),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();

    // Eight connections fill the listener: silent ones and preface-only.
    let mut idle = Vec::new();
    for i in 0..8 {
        let mut tcp = TcpStream::connect(inbound).await.unwrap();
        if i % 2 == 1 {
            tcp.write_all(PREFACE).await.unwrap();
        }
        idle.push(tcp);
    }
    let opened = Instant::now();
    // The ninth is closed at once: the listener is at its limit.
    let mut excess = TcpStream::connect(inbound).await.unwrap();
    let took = closed_within(&mut excess, Duration::from_secs(2)).await;
    assert!(took.is_some(), "a connection past the limit was kept open");

    // The eight go when the header timeout (3 s) runs out, not before.
    for tcp in &mut idle {
        assert!(closed_within(tcp, Duration::from_secs(10)).await.is_some());
    }
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_millis(2500) && after < Duration::from_secs(10),
        "idle connections closed after {after:?} (header timeout 3 s)"
    );

    // A request head sent a byte at a time (slowloris) is cut off at the
    // header timeout, long before it would end.
    let mut slow = TcpStream::connect(inbound).await.unwrap();
    let started = Instant::now();
    let dripping = async {
        for b in b"GET /v1/charges HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(12), dripping).await;
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_secs(9),
        "a dripping request head was kept for {cut_after:?}"
    );

    // Real requests are served throughout; a keep-alive connection that
    // then idles goes after the idle timeout (2 s).
    let mut tcp = TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(format!("GET /v1/charges HTTP/1.1\r\nHost: {inbound}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    let n = tcp.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let idle_for = closed_within(&mut tcp, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        idle_for >= Duration::from_millis(1500),
        "closed after {idle_for:?}, before the 2 s idle timeout"
    );

    // What the admin port says.
    let metrics = send(payments.admin.unwrap(), "GET", "/metrics", &[], "").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("tally_listener_refused_total{listener=\"inbound\"} 1\n"),
        "{text}"
    );
    let idle_closed = text
        .lines()
        .find_map(|l| l.strip_prefix("tally_listener_idle_closed_total{listener=\"inbound\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    // The eight and the kept-alive one (the dripping one may be ended by
    // the HTTP/1 header timeout instead, which is not counted as idle).
    assert!(idle_closed >= 9, "{idle_closed}");
    assert!(
        text.contains("tally_listener_accepting{listener=\"inbound\"} 1\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_grpc_listener_closes_stalled_handshakes_and_keeps_watch_streams_open() {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let mut settings = support::broker::settings(support::mesh::POLICY);
    settings.limits = limits(2, 2, 64);
    let broker = support::broker::serve_broker(dir.path(), &key, settings, "127.0.0.1:0").await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(broker.addr).await.unwrap();
    // A TLS ClientHello that never finishes: 5 bytes of record header.
    let mut half_hello = TcpStream::connect(broker.addr).await.unwrap();
    half_hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    for tcp in [&mut silent, &mut half_hello] {
        assert!(closed_within(tcp, Duration::from_secs(10)).await.is_some());
    }
    let after = opened.elapsed();
    assert!(after >= Duration::from_millis(1500), "{after:?}");
    // A real client is still served, and its Watch stream outlives the
    // idle timeout: a request in flight is never idle.
    let channel = support::broker::channel_as(&broker, "spiffe://example.org/ns/shop/sa/checkout");
    let mut watch = tally::proto::v1::watch_client::WatchClient::new(channel);
    let mut stream = watch
        .subscribe(tally::proto::v1::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    // Past twice the idle timeout, the stream is still open (it sends the
    // rest of the current state, then waits for changes).
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(
        ended.is_err(),
        "the Watch stream ended while in flight: {ended:?}"
    );
    broker.stop().await;
}

/// Reads lines from a child's stdout on a thread, so every wait is bounded.
fn lines_of(out: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// An HTTP/1.1 keep-alive connection made before the flood: the
/// process's descriptors may be gone by the time we ask again.
struct KeptOpen(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>);

impl KeptOpen {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Self(sender)
    }

    async fn get(&mut self, path: &str) -> (u16, String) {
        use http_body_util::BodyExt as _;
        let request = http::Request::get(path)
            .header("host", "x")
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = self
            .0
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("GET {path} on a kept connection: {e}"));
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_out_of_file_descriptors_stays_up_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let broker_url = format!("https://{}", broker.grpc.replace("127.0.0.1", "localhost"));
    let token = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["ctl", "join-token", "create", "--spiffe-id", PAYMENTS])
        .arg("--broker")
        .arg(&broker_url)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(token.status.code(), Some(0));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let app = App::start().await;

    // 64 descriptors: the runtime, the broker connection, the listeners
    // and the socket leave a few dozen for connections; the default
    // connection cap (1,024) is far above that, so accept hits EMFILE.
    let mut sidecar = Killed(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_tally"))
            .args(["sidecar", "--broker", &broker_url])
            .arg("--trust-bundle")
            .arg(data.join("bundle.pem"))
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .args(["--inbound-listen", "127.0.0.1:0", "--upstream"])
            .arg(app.addr.to_string())
            .args(["--admin-listen", "127.0.0.1:0", "--header-timeout", "2s"])
            .env("TALLY_JOIN_TOKEN", &token)
            .env("TALLY_LOG", "tally::http=debug")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("sidecar.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(sidecar.0.stdout.take().unwrap());
    let address_after = |prefix: &str| -> std::net::SocketAddr {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the sidecar printed its addresses");
            if let Some(rest) = line.split(prefix).nth(1) {
                return rest.split([',', ' ']).next().unwrap().parse().unwrap();
            }
        }
    };
    let inbound = address_after("inbound proxy listening on ");
    let admin = address_after("admin listening on ");
    // Each sends its first request at once (within the header timeout).
    let mut admin_conn = KeptOpen::connect(admin).await;
    let mut metrics_conn = KeptOpen::connect(admin).await;
    let mut inbound_conn = KeptOpen::connect(inbound).await;
    assert_eq!(admin_conn.get("/readyz").await.0, 200);
    assert_eq!(metrics_conn.get("/healthz").await.0, 200);
    assert_eq!(inbound_conn.get("/v1/charges").await.0, 401);

    // The flood: silent and preface-only connections, far more than the
    // process has descriptors for.
    let mut flood = Vec::new();
    for i in 0..200 {
        let mut tcp = TcpStream::connect(inbound).await.unwrap();
        if i % 2 == 1 {
            let _ = tcp.write_all(PREFACE).await;
        }
        flood.push(tcp);
    }
    // Not ready while accepting fails, and it says why, in its log (at
    // most once a second)...
    let log_path = dir.path().join("sidecar.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("cannot accept connections; backing off")
    {
        if let Some(exit) = sidecar.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(&log_path).unwrap();
            panic!("the sidecar exited ({exit}): {log}");
        }
        assert!(Instant::now() < deadline, "no accept failure was logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and on its admin port, over connections it already holds (one
    // request each), while the connections it holds are still served.
    let (status, body) = admin_conn.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the inbound listener cannot accept connections"),
        "{body}"
    );
    let (_, metrics) = metrics_conn.get("/metrics").await;
    let accept_errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tally_listener_accept_errors_total{listener=\"inbound\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(accept_errors.is_some_and(|n| n > 0), "{metrics}");
    assert_eq!(inbound_conn.get("/v1/charges").await.0, 401);
    assert!(
        sidecar.0.try_wait().unwrap().is_none(),
        "the sidecar exited"
    );

    // Every flood connection is closed within its header timeout of
    // being accepted: a few rounds of 2 s as descriptors free up.
    for tcp in &mut flood {
        assert!(
            closed_within(tcp, Duration::from_secs(60)).await.is_some(),
            "a flood connection was never closed"
        );
    }
    drop(flood);
    // Then it accepts again, is ready, and serves new connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = send(admin, "GET", "/readyz", &[], "").await;
        let (status, body) = (
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        );
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready again: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = send(inbound, "GET", "/v1/charges", &[], "").await;
    assert_eq!(answer.status, 401);
    assert!(
        sidecar.0.try_wait().unwrap().is_none(),
        "the sidecar exited"
    );
    let log = std::fs::read_to_string(dir.path().join("sidecar.log")).unwrap();
    let warnings = log
        .matches("cannot accept connections; backing off")
        .count();
    assert!(
        (1..=30).contains(&warnings),
        "{warnings} warnings logged: rate limit"
    );
}

/// A child process killed when the test ends, passing or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_takes_its_response_does_not_keep_the_connection() {
    // HTTP/2 with a zero stream window: the response head arrives, its
    // body can never be sent, and the client still answers pings.
    let mesh = Mesh::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                admin: true,
                limits: Some(limits(2, 2, 64)),
                ..Parts::default()
            },
        )
        .await;
    let tcp = TcpStream::connect(payments.admin.unwrap()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(500))
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::get("http://admin/metrics")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let started = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    // Never read: the connection is closed after the idle timeout.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "a stalled response kept its connection open");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    drop(response);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_sent_a_byte_at_a_time_is_cut_off() {
    let mesh = Mesh::start().await;
    let checkout = mesh
        .sidecar(
            support::mesh::CHECKOUT,
            Parts {
                socket: true,
                ..Parts::default()
            },
        )
        .await;
    let mut unix = tokio::net::UnixStream::connect(checkout.socket.as_deref().unwrap())
        .await
        .unwrap();
    unix.write_all(b"POST /v1/authorize HTTP/1.1\r\nHost: tally\r\nContent-Length: 4000\r\n\r\n{")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = unix.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        answer.extend_from_slice(&buf[..n]);
                        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                            return;
                        }
                    }
                },
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    let _ = unix.write_all(b" ").await;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "a dripping body was read for 20 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("did not arrive within 10s"), "{text}");
    assert!(started.elapsed() >= Duration::from_secs(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_hold_their_slot_and_end_when_quiet() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let checkout = mesh
        .sidecar(
            support::mesh::CHECKOUT,
            Parts {
                socket: true,
                outbound: true,
                limits: Some(limits(5, 2, 2)),
                ..Parts::default()
            },
        )
        .await;
    let outbound = checkout.outbound.unwrap();
    let connect = || async {
        let mut tcp = TcpStream::connect(outbound).await.unwrap();
        tcp.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", app.addr).as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 256];
        let n = tcp.read(&mut head).await.unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
        tcp
    };
    let mut first = connect().await;
    let _second = connect().await;
    // Both tunnels still hold their slots: a third connection is refused.
    let mut third = TcpStream::connect(outbound).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2))
            .await
            .is_some()
    );
    // A quiet tunnel ends after the idle timeout (2 s); traffic keeps one
    // alive until then.
    let opened = Instant::now();
    assert!(
        closed_within(&mut first, Duration::from_secs(10))
            .await
            .is_some()
    );
    assert!(opened.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_inbound_port_a_stalled_or_garbled_tls_start_is_closed_and_the_port_serves_on() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                limits: Some(limits(2, 2, 64)),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    // The first byte of a TLS record, then nothing: the handshake never
    // completes, and the header timeout (2 s) ends it.
    let mut stalled = TcpStream::connect(inbound).await.unwrap();
    stalled.write_all(&[0x16]).await.unwrap();
    let took = closed_within(&mut stalled, Duration::from_secs(8))
        .await
        .expect("a stalled TLS start was kept open");
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    // A TLS record header followed by garbage: refused at once.
    let mut garbled = TcpStream::connect(inbound).await.unwrap();
    garbled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .unwrap();
    assert!(
        closed_within(&mut garbled, Duration::from_secs(1))
            .await
            .is_some(),
        "a garbled handshake was kept open"
    );
    // Plaintext still served beside them.
    let answer = send(inbound, "GET", "/v1/charges", &[], "").await;
    assert_eq!(answer.status, 401);
    mesh.broker.stop().await;
}
