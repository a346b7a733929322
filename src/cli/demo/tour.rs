//! The narrated steps of the tour, each checking its outcome.

use super::app::{Tally, call, header, headers_for, headers_with_nonce, request, short};
use super::mesh::Mesh;
use super::{CHECKOUT, TRUST_DOMAIN, failed};
use crate::cli::CliError;
use crate::dpop::ProofKey;
use crate::http::Answer;
use bytes::Bytes;
use http::StatusCode;
use std::time::Duration;

/// What the thief copies in step 6 (the headers step 5 obtained).
#[derive(Clone)]
struct Stolen {
    token: String,
    authorization: String,
    proof: String,
}

/// The tour over a running [`Mesh`].
pub(super) struct Tour<'a> {
    mesh: &'a Mesh,
    /// What went as narrated.
    pub(super) tally: Tally,
    host: String,
    charges: String,
    stolen: Option<Stolen>,
}

impl<'a> Tour<'a> {
    pub(super) fn new(mesh: &'a Mesh) -> Self {
        Self {
            mesh,
            tally: Tally::default(),
            host: mesh.inbound_addr.to_string(),
            charges: format!("http://{}/v1/charges", mesh.inbound_addr),
            stolen: None,
        }
    }

    /// Every step, in order.
    ///
    /// # Errors
    /// When a step cannot run at all (an outcome other than the narrated
    /// one is counted in [`Tour::tally`] instead).
    pub(super) async fn run(&mut self) -> Result<(), CliError> {
        self.outbound_proxy().await?;
        self.socket_api().await?;
        self.thief().await?;
        self.wrong_url().await?;
        self.scopes().await?;
        self.revocation().await?;
        self.audit_lookup().await?;
        self.metrics().await
    }

    fn stolen(&self) -> Result<&Stolen, CliError> {
        self.stolen
            .as_ref()
            .ok_or_else(|| CliError::Failed("the socket API step did not run".into()))
    }

    /// `POST /v1/charges` straight to the payments sidecar's inbound proxy
    /// with these headers.
    async fn charge(
        &self,
        authorization: String,
        dpop: String,
        body: &'static str,
    ) -> Result<Answer, CliError> {
        let headers = [
            ("authorization", authorization.as_str()),
            ("dpop", dpop.as_str()),
        ];
        call(
            self.mesh.inbound_addr,
            request("POST", "/v1/charges", &self.host, &headers, body),
        )
        .await
    }

    /// Step 4: a call through the outbound proxy (the app sets `HTTP_PROXY`).
    async fn outbound_proxy(&mut self) -> Result<(), CliError> {
        let outbound_addr = self.mesh.outbound_addr;
        let host = &self.host;
        let charges = &self.charges;
        say!(
            "4. checkout charges a card through its outbound proxy (the app sets HTTP_PROXY, nothing else)"
        );
        say!("   POST {charges}  via proxy {outbound_addr}");
        let answer = call(
            outbound_addr,
            request(
                "POST",
                charges,
                host,
                &[
                    ("x-tally-scope", "payments:charge"),
                    ("content-type", "application/json"),
                ],
                r#"{"amount": 1250}"#,
            ),
        )
        .await?;
        self.tally.check(
            "call through the outbound proxy",
            &answer,
            StatusCode::CREATED,
        );
        say!(
            "   the payments app received: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let transport = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["transport"].as_str().map(str::to_owned))
            .unwrap_or_default();
        self.tally.expect(
            "the hop between the sidecars was mutual TLS",
            transport == "mtls",
            &format!(
                "the hop between the sidecars was {transport}: both SVIDs in the TLS handshake, so the token went without a per-request proof\n"
            ),
        );
        Ok(())
    }

    /// Step 5: headers from the socket API, the request sent by the app.
    async fn socket_api(&mut self) -> Result<(), CliError> {
        let socket = &self.mesh.socket;
        let charges = &self.charges;
        say!(
            "5. The same through the socket API: the app asks for headers, then sends the request itself"
        );
        let (status, mut authorization, mut proof, why) =
            headers_for(socket, charges, "payments:charge").await?;
        if status != 200 {
            return Err(CliError::Failed(format!(
                "/v1/authorize answered {status}: {why}"
            )));
        }
        let token = authorization.trim_start_matches("DPoP ").to_owned();
        say!("   Authorization: DPoP {}", short(&token));
        say!("   DPoP: {}", short(&proof));
        let mut answer = self
            .charge(authorization.clone(), proof.clone(), r#"{"amount": 990}"#)
            .await?;
        // A sidecar that just started cannot know which proofs its
        // predecessor saw: it asks for a nonce of its own, once (step 4's
        // hop was mutual TLS, which needs none).
        let nonce = (answer.status == StatusCode::UNAUTHORIZED)
            .then(|| header(&answer, "dpop-nonce"))
            .filter(|n| !n.is_empty());
        if let Some(nonce) = nonce {
            say!(
                "   401 use_dpop_nonce: the payments sidecar just started and wants its nonce in the proof; asking again"
            );
            let again = headers_with_nonce(socket, charges, "payments:charge", Some(nonce)).await?;
            (authorization, proof) = (again.1, again.2);
            answer = self
                .charge(authorization.clone(), proof.clone(), r#"{"amount": 990}"#)
                .await?;
        }
        self.tally.check(
            "call with headers from the socket",
            &answer,
            StatusCode::CREATED,
        );
        say!(
            "   the payments app received: {}",
            String::from_utf8_lossy(&answer.body)
        );
        say!("   (the app got the caller's identity in x-tally-caller, never the token)\n");
        self.stolen = Some(Stolen {
            token,
            authorization,
            proof,
        });
        Ok(())
    }

    /// Step 6: the copied token with a thief's key, then the replayed request.
    async fn thief(&mut self) -> Result<(), CliError> {
        let clock = &self.mesh.clock;
        let charges = &self.charges;
        let Stolen {
            token,
            authorization,
            proof,
        } = self.stolen()?.clone();
        say!("6. A thief copies that token from a log and signs a proof with a key of their own");
        let thief = ProofKey::generate().map_err(|e| failed("the thief's key", &e))?;
        let forged = thief
            .mint("POST", charges, Some(&token), None, clock.now())
            .map_err(|e| failed("the thief's proof", &e))?;
        let answer = self.charge(authorization.clone(), forged, "{}").await?;
        self.tally.check(
            "stolen token, thief's key",
            &answer,
            StatusCode::UNAUTHORIZED,
        );
        say!(
            "   WWW-Authenticate: {}",
            header(&answer, "www-authenticate")
        );
        say!("   ...and replays the exact request it captured, proof and all");
        let answer = self.charge(authorization, proof, "{}").await?;
        self.tally
            .check("replayed request", &answer, StatusCode::UNAUTHORIZED);
        say!(
            "   WWW-Authenticate: {}\n",
            header(&answer, "www-authenticate")
        );
        Ok(())
    }

    /// Step 7: a proof made for one URL, sent to another.
    async fn wrong_url(&mut self) -> Result<(), CliError> {
        let socket = &self.mesh.socket;
        let inbound_addr = self.mesh.inbound_addr;
        say!("7. A proof made for one URL, sent to another");
        let refunds = format!("http://{inbound_addr}/v1/refunds");
        let (_, authorization, other, _) = headers_for(socket, &refunds, "payments:charge").await?;
        let answer = self.charge(authorization, other, "{}").await?;
        self.tally
            .check("proof for another URL", &answer, StatusCode::UNAUTHORIZED);
        say!(
            "   WWW-Authenticate: {}\n",
            header(&answer, "www-authenticate")
        );
        Ok(())
    }

    /// Step 8: a scope the policy does not grant, and a read-only token on a charge.
    async fn scopes(&mut self) -> Result<(), CliError> {
        let socket = &self.mesh.socket;
        let charges = &self.charges;
        say!("8. checkout asks for a scope the policy does not grant (payments:refund)");
        let (status, _, _, why) = headers_for(socket, charges, "payments:refund").await?;
        let answer = Answer {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers: http::HeaderMap::new(),
            body: Bytes::from(why.clone()),
        };
        self.tally
            .check("scope not granted", &answer, StatusCode::FORBIDDEN);
        say!("   {why}");
        say!("   ...and with a read-only token, tries to charge anyway");
        let (_, authorization, read_only, _) =
            headers_for(socket, charges, "payments:read").await?;
        let answer = self.charge(authorization, read_only, "{}").await?;
        self.tally.check(
            "read-only token on a charge",
            &answer,
            StatusCode::FORBIDDEN,
        );
        say!(
            "   WWW-Authenticate: {}\n",
            header(&answer, "www-authenticate")
        );
        Ok(())
    }

    /// Step 9: the workload revoked while it holds fresh headers.
    async fn revocation(&mut self) -> Result<(), CliError> {
        let broker = &self.mesh.broker;
        let socket = &self.mesh.socket;
        let payments = &self.mesh.payments;
        let charges = &self.charges;
        say!("9. The security team revokes the checkout workload (a compromised pod)");
        let before = payments.parts().mesh.borrow().revocations_seen;
        let admin = format!("spiffe://{TRUST_DOMAIN}/admin")
            .parse()
            .map_err(|e| failed("admin ID", &e))?;
        let checkout_id = CHECKOUT.parse().map_err(|e| failed("demo ID", &e))?;
        // Headers the compromised pod obtained just before.
        let (status, held, held_proof, why) =
            headers_for(socket, charges, "payments:charge").await?;
        if status != 200 {
            return Err(CliError::Failed(format!(
                "/v1/authorize answered {status}: {why}"
            )));
        }
        let revoked_at = std::time::Instant::now();
        let (sequence, _) = broker
            .revoke(
                crate::token::RevocationTarget::Subject(checkout_id),
                None,
                "demo: compromised pod",
                &admin,
            )
            .await
            .map_err(|e| failed("revoking", &e))?;
        let mut mesh = payments.parts().mesh.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            mesh.wait_for(|m| m.revocations_seen > before),
        )
        .await
        .map_err(|_| CliError::Failed("the revocation did not reach the payments sidecar".into()))?
        .map_err(|e| failed("the payments sidecar", &e))?;
        let lag = revoked_at.elapsed();
        say!(
            "   revoked (watch sequence {sequence}); the payments sidecar enforced it {:.1} ms after the call",
            lag.as_secs_f64() * 1000.0
        );
        let answer = self.charge(held, held_proof, "{}").await?;
        self.tally.check(
            "call after the workload was revoked",
            &answer,
            StatusCode::UNAUTHORIZED,
        );
        say!(
            "   WWW-Authenticate: {}\n",
            header(&answer, "www-authenticate")
        );
        Ok(())
    }

    /// Step 10: what the stolen token did, from the audit log.
    async fn audit_lookup(&mut self) -> Result<(), CliError> {
        let broker = &self.mesh.broker;
        let token = self.stolen()?.token.clone();
        say!(
            "10. The stolen token turns up in a paste: what did it do? (`tally ctl audit lookup --token`)"
        );
        // The payments sidecar reports its refusals every 200 ms here (10 s by
        // default); wait for the thief's attempts to be in the log.
        let refused_uses = |found: &Option<crate::broker::governance::TokenLookup>| -> u64 {
            found.as_ref().map_or(0, |f| {
                f.records
                    .iter()
                    .filter(|r| r.kind == crate::audit::AuditKind::VerifyFailure.as_str())
                    .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.line).ok())
                    .filter_map(|v| v["count"].as_u64())
                    .sum()
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = broker
                .lookup_token(&token)
                .await
                .map_err(|e| failed("looking up the token", &e))?;
            // The thief's two attempts (step 6), at least.
            if refused_uses(&found) >= 2 || std::time::Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match &found {
            Some(f) => {
                say!(
                    "   issued to {} for {} ({}); {}",
                    f.token.sub,
                    f.token
                        .aud
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                    f.token.scope,
                    if f.revoked { "revoked" } else { "live" }
                );
                for r in &f.records {
                    let v: serde_json::Value = serde_json::from_str(&r.line).unwrap_or_default();
                    let text = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                    let detail = match v["reason"].as_str() {
                        Some(reason) => format!(
                            ": {reason} ×{} on {} {}, reported by {}",
                            v["count"],
                            text("method"),
                            text("path"),
                            text("actor")
                        ),
                        None => String::new(),
                    };
                    say!(
                        "   #{} {} {} {}{detail}",
                        r.seq,
                        text("time"),
                        r.kind,
                        text("outcome")
                    );
                }
            }
            None => say!("   not found"),
        }
        let failures = refused_uses(&found);
        self.tally.expect(
            "audit lookup of the stolen token",
            found
                .as_ref()
                .is_some_and(|f| f.token.sub.as_str() == CHECKOUT)
                && failures >= 2,
            &format!("holder found from the token alone, with its {failures} refused uses\n"),
        );
        Ok(())
    }

    /// The payments sidecar's count of what it refused.
    async fn metrics(&mut self) -> Result<(), CliError> {
        let payments_admin_addr = self.mesh.payments_admin_addr;
        let metrics = call(
            payments_admin_addr,
            request("GET", "/metrics", &payments_admin_addr.to_string(), &[], ""),
        )
        .await?;
        say!("The payments sidecar's count (from http://{payments_admin_addr}/metrics):");
        for line in String::from_utf8_lossy(&metrics.body)
            .lines()
            .filter(|l| l.starts_with("tally_sidecar_inbound_requests_total"))
        {
            say!("   {line}");
        }
        say!("");
        Ok(())
    }
}
