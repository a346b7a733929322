//! The scene the sidecar proxy tests start from: a broker, an app behind
//! payments' inbound proxy, checkout calling it, and the small requests
//! and waits they share.

use super::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, send};

/// A checkout sidecar (socket + outbound proxy) and a payments sidecar
/// (inbound proxy in front of `app`, admin port).
pub async fn pair(
    mesh: &Mesh,
    app: &App,
    nonces: bool,
) -> (super::mesh::Started, super::mesh::Started) {
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                admin: true,
                nonces,
                ..Parts::default()
            },
        )
        .await;
    let checkout = caller(mesh, CHECKOUT, payments.inbound.unwrap()).await;
    (checkout, payments)
}

/// A broker, the app, checkout calling payments (no server nonces), and
/// where to reach them.
pub struct Scene {
    pub mesh: Mesh,
    pub app: App,
    pub checkout: super::mesh::Started,
    pub payments: super::mesh::Started,
    /// Checkout's socket.
    pub socket: std::path::PathBuf,
    /// Payments' inbound proxy.
    pub inbound: std::net::SocketAddr,
    /// `POST` here to charge.
    pub url: String,
}

impl Scene {
    pub async fn start() -> Self {
        let mesh = Mesh::start().await;
        let app = App::start().await;
        let (checkout, payments) = pair(&mesh, &app, false).await;
        let socket = checkout.socket.clone().unwrap();
        let inbound = payments.inbound.unwrap();
        Self {
            url: format!("http://{inbound}/v1/charges"),
            mesh,
            app,
            checkout,
            payments,
            socket,
            inbound,
        }
    }

    /// Stops both sidecars, the app and the broker.
    pub async fn stop(self) {
        self.checkout.sidecar.stop().await.unwrap();
        self.payments.sidecar.stop().await.unwrap();
        self.app.stop();
        self.mesh.broker.stop().await;
    }
}

/// A calling sidecar for `id` (socket and outbound proxy) whose service
/// map sends `inbound` to the payments audience.
pub async fn caller(mesh: &Mesh, id: &str, inbound: std::net::SocketAddr) -> super::mesh::Started {
    let started = mesh
        .sidecar(
            id,
            Parts {
                socket: true,
                outbound: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    let scope = if id == CHECKOUT {
        "payments:charge"
    } else {
        "payments:read"
    };
    super::mesh::prime_nonce(started.socket.as_deref().unwrap(), inbound, scope).await;
    started
}

/// `POST /v1/charges` to the inbound proxy with these credentials.
pub async fn charge_with(
    inbound: std::net::SocketAddr,
    authorization: &str,
    dpop: &str,
) -> super::mesh::Answer {
    let headers = [("authorization", authorization), ("dpop", dpop)];
    send(inbound, "POST", "/v1/charges", &headers, "").await
}

pub fn challenge(answer: &super::mesh::Answer) -> String {
    answer.header("www-authenticate").unwrap_or("").to_owned()
}

/// The claims of the token in an `Authorization: DPoP …` value.
pub fn claims_of(authorization: &str) -> serde_json::Value {
    let payload = authorization
        .trim_start_matches("DPoP ")
        .split('.')
        .nth(1)
        .unwrap();
    serde_json::from_slice(&tally::jose::b64::decode(payload.as_bytes()).unwrap()).unwrap()
}

/// Waits until the sidecar has received `n` revocations.
pub async fn revocations(sidecar: &super::mesh::Started, n: u64) {
    let mut mesh = sidecar.sidecar.parts().mesh.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        mesh.wait_for(|m| m.revocations_seen >= n),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "revocation {n} never arrived; seen {}",
            sidecar.sidecar.parts().mesh.borrow().revocations_seen
        )
    })
    .unwrap();
}

/// Reads from `tcp` until a blank line ends the response head; returns it
/// and whatever came after.
pub async fn response_head(tcp: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return (String::from_utf8_lossy(&got).into_owned(), rest);
        }
    }
}
