//! Governance costs: what the hash chain adds to every audit record, how
//! fast `audit verify` checks a log, and an access review over a large
//! inventory summary.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tally::audit::{AuditEvent, AuditKind, ChainHash, ChainVerifier, Outcome};
use tally::policy::Policy;
use tally::policy::review::{Seen, Usage, review};
use tally::token::TokenClass;

/// An issuance record as the broker writes it.
fn issuance(seq: u64) -> AuditEvent {
    AuditEvent::new(
        AuditKind::TokenIssue,
        Outcome::Ok,
        1_800_000_000 + seq / 1000,
    )
    .actor("spiffe://example.org/ns/shop/sa/checkout")
    .field("audience", "spiffe://example.org/ns/pay/sa/payments")
    .field("scope", "payments:charge payments:read")
    .field("via", "grpc")
    .field("class", "service")
    .field("jti", format!("06b4f2a1c{seq:06x}Qk3v0W9kq1x2Yb8d5LZr4A"))
    .field("jkt", "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I")
    .field("exp", 1_800_000_300u64)
    .field("kid", "nEYfoVOBw2qXaXUd0bOo2BKqOZ4qkYh3lH6J3IQXfVQ")
    .field(
        "token_hmac",
        "5f0c1e6f2b8e4a7d9c3b1a0f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d",
    )
}

fn chain(c: &mut Criterion) {
    let event = issuance(1);
    let prev = ChainHash::GENESIS;
    c.bench_function("audit record: line and chain hash", |b| {
        b.iter(|| {
            let line = black_box(&event).to_line(black_box(7), &prev);
            black_box(ChainHash::of(&line))
        });
    });
    let line = event.to_line(7, &prev);
    c.bench_function(
        "audit record: chain hash alone (SHA-256 of the line)",
        |b| {
            b.iter(|| black_box(ChainHash::of(black_box(&line))));
        },
    );
    let mut prev = ChainHash::GENESIS;
    let lines: Vec<String> = (1..=10_000)
        .map(|seq| {
            let line = issuance(seq).to_line(seq, &prev);
            prev = ChainHash::of(&line);
            line
        })
        .collect();
    c.bench_function("audit verify, 10,000 records", |b| {
        b.iter(|| {
            let mut v = ChainVerifier::new(1);
            for line in &lines {
                v.push(line).unwrap();
            }
            black_box(v.head())
        });
    });
}

fn access_review(c: &mut Criterion) {
    // 200 workloads, each with its own rule; 10,000 usage rows (the
    // distinct holder × audience × scopes × class combinations of 30 days).
    let mut yaml = String::from("trust_domain: example.org\nissue:\n");
    for i in 0..200 {
        yaml.push_str(&format!(
            "  - from: spiffe://example.org/ns/n{i}/sa/app\n    to: spiffe://example.org/ns/n{}/sa/app\n    scopes: [s{i}:read, s{i}:write]\n",
            (i + 1) % 200
        ));
    }
    let policy = Policy::parse(&yaml).unwrap();
    let usage: Vec<Usage> = (0..10_000)
        .map(|n| {
            let i = n % 200;
            Usage {
                sub: format!("spiffe://example.org/ns/n{i}/sa/app")
                    .parse()
                    .unwrap(),
                aud: format!("spiffe://example.org/ns/n{}/sa/app", (i + 1) % 200)
                    .parse()
                    .unwrap(),
                scopes: format!("s{i}:read").parse().unwrap(),
                class: TokenClass::Service,
                count: 10,
                longest_life: 300,
            }
        })
        .collect();
    let seen: Vec<Seen> = (0..200)
        .map(|i| Seen {
            id: format!("spiffe://example.org/ns/n{i}/sa/app")
                .parse()
                .unwrap(),
            last_seen: 1_800_000_000,
        })
        .collect();
    c.bench_function("access review, 200 rules x 10,000 usage rows", |b| {
        b.iter(|| black_box(review(&policy, &usage, &seen, 1_700_000_000, 3_600)));
    });
}

criterion_group!(benches, chain, access_review);
criterion_main!(benches);
