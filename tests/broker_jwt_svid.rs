//! `Tokens.IssueJwtSvid` on a real broker over mTLS gRPC: JWT-SVIDs that
//! verify with the broker's JWKS as the SPIFFE standard describes them,
//! granted by the issue rules (audiences, lifetimes, rate limits), refused
//! to denied identities, recorded in the audit log and the inventory, and
//! revocable by jti through the Watch stream.

mod support;

use support::broker::{ServedBroker, channel_as, serve_broker, settings};
use tally::clock::{Clock, SystemClock};
use tally::identity::denial::DENIED_METADATA;
use tally::proto::v1 as pb;
use tally::store::{AuditFilter, TokenFilter};
use tally::token::{TokenKind, jwt_svid};
use tonic::Code;

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const LIMITED: &str = "spiffe://example.org/ns/shop/sa/limited";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
const API: &str = "https://api.example.org";
const ADMIN_API: &str = "https://admin.example.org";

const POLICY: &str = "
trust_domain: example.org
classes:
  service: { default_ttl: 5m, max_ttl: 15m }
  admin:   { default_ttl: 1m, max_ttl: 5m }
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:charge]
    class: service
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: https://api.example.org
    scopes: [read]
    class: service
    max_ttl: 2m
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: https://admin.example.org
    scopes: [admin]
    class: admin
  - from: spiffe://example.org/ns/shop/sa/limited
    to: https://api.example.org
    scopes: [read]
    class: service
    rate: 2/m
";

async fn start() -> (tempfile::TempDir, ServedBroker) {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(POLICY), "127.0.0.1:0").await;
    (dir, served)
}

async fn ask(
    served: &ServedBroker,
    id: &str,
    audiences: &[&str],
    ttl: u32,
) -> Result<pb::JwtSvidResponse, tonic::Status> {
    pb::tokens_client::TokensClient::new(channel_as(served, id))
        .issue_jwt_svid(pb::JwtSvidRequest {
            audience: audiences.iter().map(|a| (*a).to_owned()).collect(),
            ttl_seconds: ttl,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn now() -> u64 {
    SystemClock.now()
}

#[tokio::test]
async fn a_jwt_svid_for_a_permitted_audience_verifies_and_is_recorded_before_it_is_answered() {
    let (_dir, served) = start().await;
    let got = ask(&served, CHECKOUT, &[PAYMENTS], 0).await.unwrap();
    let broker = &served.broker;
    let v = jwt_svid::verify(&got.svid, &broker.jwks(), PAYMENTS, now(), 5).unwrap();
    assert_eq!(v.sub.as_str(), CHECKOUT);
    assert_eq!(v.aud, vec![PAYMENTS.to_owned()]);
    assert_eq!(v.claims["aud"], PAYMENTS, "one audience is a string");
    let iat = v.iat.unwrap();
    assert_eq!(v.exp - iat, 300, "the service class default");
    assert_eq!(i64::try_from(v.exp).unwrap(), got.expires_at);
    assert_eq!(v.jti.as_deref(), Some(got.jti.as_str()));
    assert_eq!(v.kid, got.kid);
    for absent in ["cnf", "scope", "client_id", "tcl"] {
        assert!(!v.claims.contains_key(absent), "{absent} in {:?}", v.claims);
    }
    let jws = tally::jose::Jws::parse(&got.svid, &tally::jose::Limits::default()).unwrap();
    assert_eq!(jws.typ(), Some("JWT"));
    // It is no access token for that audience.
    let config = tally::token::TokenConfig::new(broker.issuer(), PAYMENTS.parse().unwrap());
    assert!(tally::token::verify(&got.svid, &broker.jwks(), &config, now(), &mut ()).is_err());

    // In the inventory, as a JWT-SVID without a key binding.
    let filter = TokenFilter {
        now: now(),
        kind: Some(TokenKind::JwtSvid),
        ..TokenFilter::default()
    };
    let live = broker.store().find_live_tokens(&filter, 10).await.unwrap();
    assert_eq!(live.len(), 1);
    let row = &live[0];
    assert_eq!(
        (row.jti.as_str(), row.sub.as_str()),
        (got.jti.as_str(), CHECKOUT)
    );
    assert_eq!(
        row.aud.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [PAYMENTS]
    );
    assert_eq!(
        (row.jkt, row.scope.is_empty(), row.exp),
        (None, true, v.exp)
    );
    assert_eq!(row.token_hmac, broker.token_hmac(&got.svid));

    // In the audit log, by jti and keyed hash, never the token itself.
    let filter = AuditFilter {
        jti: Some(got.jti.clone()),
        ..AuditFilter::default()
    };
    let records = broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, "jwt_svid.issue");
    let line: serde_json::Value = serde_json::from_str(&records[0].line).unwrap();
    assert_eq!(line["outcome"], "ok");
    assert_eq!(line["actor"], CHECKOUT);
    assert_eq!(line["audience"], serde_json::json!([PAYMENTS]));
    assert_eq!(
        (line["kid"].as_str(), line["exp"].as_u64()),
        (Some(got.kid.as_str()), Some(v.exp))
    );
    assert_eq!(
        line["token_hmac"],
        tally::audit::hex(&broker.token_hmac(&got.svid))
    );
    assert!(!records[0].line.contains(&got.svid));
    let lookup = broker.lookup_token(&got.svid).await.unwrap().unwrap();
    assert_eq!(lookup.token.kind, TokenKind::JwtSvid);

    let metrics = broker.render_metrics().await;
    assert!(
        metrics
            .contains(r#"tally_broker_jwt_svid_issuance_total{result="issued",class="service"} 1"#),
        "{metrics}"
    );
    served.stop().await;
}

#[tokio::test]
async fn several_audiences_make_one_jwt_svid_whose_life_the_strictest_rule_caps() {
    let (_dir, served) = start().await;
    let jwks = served.broker.jwks();
    let got = ask(&served, CHECKOUT, &[PAYMENTS, API, PAYMENTS], 0)
        .await
        .unwrap();
    for aud in [PAYMENTS, API] {
        let v = jwt_svid::verify(&got.svid, &jwks, aud, now(), 5).unwrap();
        assert_eq!(
            v.claims["aud"],
            serde_json::json!([PAYMENTS, API]),
            "duplicates collapsed"
        );
        assert_eq!(
            v.exp - v.iat.unwrap(),
            120,
            "the api rule's max_ttl caps the default"
        );
    }
    // Asked for longer than a rule allows: capped; shorter: as asked.
    for (ttl, life) in [(3600, 120), (30, 30)] {
        let got = ask(&served, CHECKOUT, &[PAYMENTS, API], ttl).await.unwrap();
        let v = jwt_svid::verify(&got.svid, &jwks, API, now(), 5).unwrap();
        assert_eq!(v.exp - v.iat.unwrap(), life, "ttl {ttl}");
    }
    // The admin class's default is the shortest: it wins, and is recorded.
    let got = ask(&served, CHECKOUT, &[PAYMENTS, ADMIN_API], 0)
        .await
        .unwrap();
    let v = jwt_svid::verify(&got.svid, &jwks, ADMIN_API, now(), 5).unwrap();
    assert_eq!(v.exp - v.iat.unwrap(), 60);
    let lookup = served
        .broker
        .lookup_token(&got.svid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lookup.token.class, tally::token::TokenClass::Admin);
    assert_eq!(lookup.token.aud.len(), 2);
    served.stop().await;
}

#[tokio::test]
async fn an_audience_no_rule_grants_is_refused_by_name_and_nothing_is_issued() {
    let (_dir, served) = start().await;
    let e = ask(&served, CHECKOUT, &[PAYMENTS, "https://other.example"], 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("https://other.example"),
        "{}",
        e.message()
    );
    // Another caller gets nothing for checkout's audience either.
    let e = ask(&served, LIMITED, &[PAYMENTS], 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let live = served.broker.store().live_tokens(now(), 10).await.unwrap();
    assert!(live.is_empty(), "{live:?}");
    let filter = AuditFilter {
        kind: Some("jwt_svid.issue".into()),
        ..AuditFilter::default()
    };
    let records = served.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(records.len(), 2);
    let line: serde_json::Value = serde_json::from_str(&records[0].line).unwrap();
    assert_eq!(
        (line["outcome"].as_str(), line["reason"].as_str()),
        (Some("denied"), Some("no_rule"))
    );

    // Malformed requests: InvalidArgument, naming what is wrong.
    let many: Vec<String> = (0..17).map(|i| format!("https://a{i}.example")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for (audiences, needle) in [
        (&[][..], "at least one audience"),
        (&["https://ok.example", "not one"][..], "not one"),
        (&many[..], "at most 16"),
    ] {
        let e = ask(&served, CHECKOUT, audiences, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "{}", e.message());
    }
    let long = format!("https://{}.example", "a".repeat(600));
    let e = ask(&served, CHECKOUT, &[&long], 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    served.stop().await;
}

#[tokio::test]
async fn each_granting_rules_rate_limit_is_spent() {
    let (_dir, served) = start().await;
    for _ in 0..2 {
        ask(&served, LIMITED, &[API], 0).await.unwrap();
    }
    let e = ask(&served, LIMITED, &[API], 0).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let retry: u64 = e
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another caller's budget under another rule is its own.
    ask(&served, CHECKOUT, &[API], 0).await.unwrap();
    served.stop().await;
}

#[tokio::test]
async fn a_denied_identity_gets_no_jwt_svid() {
    let (_dir, served) = start().await;
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin/ops".parse().unwrap();
    served
        .broker
        .deny_identity(&CHECKOUT.parse().unwrap(), "compromised", &admin)
        .await
        .unwrap();
    let e = ask(&served, CHECKOUT, &[PAYMENTS], 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.metadata().get(DENIED_METADATA).is_some());
    let filter = AuditFilter {
        kind: Some("jwt_svid.issue".into()),
        ..AuditFilter::default()
    };
    let records = served.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(
        records.len(),
        1,
        "the refusal is recorded under the call's own kind"
    );
    served.stop().await;
}

#[tokio::test]
async fn revoking_a_jwt_svid_by_jti_puts_it_on_the_watch_streams_revocation_list() {
    use tally::token::RevocationTarget;
    let (_dir, served) = start().await;
    let got = ask(&served, CHECKOUT, &[PAYMENTS, API], 0).await.unwrap();
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin/ops".parse().unwrap();
    let (_, revocation) = served
        .broker
        .revoke(
            RevocationTarget::Jti(got.jti.clone()),
            None,
            "leaked",
            &admin,
        )
        .await
        .unwrap();
    // Kept until the JWT-SVID itself has expired (plus leeway).
    assert!(revocation.expires_at >= u64::try_from(got.expires_at).unwrap());
    let lookup = served
        .broker
        .lookup_token(&got.svid)
        .await
        .unwrap()
        .unwrap();
    assert!(lookup.revoked);

    let mut stream = pb::watch_client::WatchClient::new(channel_as(&served, PAYMENTS))
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let revoked = loop {
        let update = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("the current state arrives")
            .unwrap()
            .expect("the stream stays open");
        if let Some(pb::update::Kind::Revocation(r)) = update.kind {
            break r;
        }
    };
    assert_eq!(revoked.target, Some(pb::revocation::Target::Jti(got.jti)));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_ctl_lists_and_looks_up_a_jwt_svid_by_its_kind() {
    use support::ctl::{mint_svid, text};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = support::broker::Spawned::start(&data);
    let checkout = dir.path().join("checkout");
    mint_svid(&broker, &data, CHECKOUT, &checkout);
    let got = pb::tokens_client::TokensClient::new(broker.channel_with(&checkout).await)
        .issue_jwt_svid(pb::JwtSvidRequest {
            audience: vec![PAYMENTS.into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    support::ctl::issue_with(&broker, &checkout).await.unwrap();

    let all = text(&broker.ctl(&data, &["tokens", "list"]));
    assert!(all.contains("KIND"), "{all}");
    let row = all
        .lines()
        .find(|l| l.contains(&got.jti))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(row.contains("jwt_svid"), "{row}");
    assert_eq!(
        all.lines().filter(|l| l.contains(" access ")).count(),
        1,
        "{all}"
    );
    let only = text(&broker.ctl(
        &data,
        &["tokens", "list", "--kind", "jwt_svid", "--output", "json"],
    ));
    let rows: serde_json::Value = serde_json::from_str(&only).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{only}");
    assert_eq!(rows[0]["kind"], "jwt_svid");
    assert_eq!(rows[0]["jti"], got.jti.as_str());
    assert_eq!(rows[0]["jkt"], "");

    let lookup = text(&broker.ctl(&data, &["audit", "lookup", "--token", &got.svid]));
    assert!(
        lookup.contains(&format!("{} (jwt_svid)", got.jti)),
        "{lookup}"
    );
    assert!(lookup.contains("jwt_svid.issue"), "{lookup}");
    assert!(
        !lookup.contains(&got.svid),
        "the token is never printed back"
    );
    broker.ctl(&data, &["revoke", "--jti", &got.jti, "--reason", "leaked"]);
    let after = text(&broker.ctl(&data, &["tokens", "list", "--kind", "jwt_svid"]));
    assert!(after.contains("revoked"), "{after}");
    broker.stop();
}
