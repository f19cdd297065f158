//! The remote tier against a real HTTP server on 127.0.0.1: error mapping, deadlines, and the
//! breaker opening, probing and closing through the router.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::server::{refused_url, Mode, TestServer};
use common::within;
use parking_lot::Mutex;
use tier_router::{
    BackendError, BreakerConfig, BreakerState, Deadline, ErrorKind, FixedGate, GaveUp, Outcome,
    RemoteConfig, RemoteEmbedder, RetryConfig, Router, RouterConfig, SkipReason, TaskFeatures,
    Tier, TierSpec, TransitionReason,
};

const LIMIT: Duration = Duration::from_secs(20);

fn remote(url: String) -> RemoteEmbedder {
    RemoteEmbedder::new(RemoteConfig {
        base_url: url,
        api_key_env: None,
        connect_timeout: Duration::from_millis(200),
        read_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap()
}

fn texts() -> Vec<String> {
    vec!["one two three".into(), "four".into(), "five six".into()]
}

fn call(r: &RemoteEmbedder) -> Result<Vec<Vec<f32>>, BackendError> {
    r.embed(&texts(), Deadline::after(Duration::from_secs(5)))
}

#[test]
fn ok_response_is_reordered_by_index() {
    within(LIMIT, || {
        let server = TestServer::start(Mode::Ok);
        let r = remote(server.base_url());
        let v = call(&r).unwrap();
        assert_eq!(
            v,
            vec![
                vec![13.0, 3.0, 1.0],
                vec![4.0, 1.0, 1.0],
                vec![8.0, 2.0, 1.0]
            ]
        );
        assert_eq!(server.requests(), 1);
        assert_eq!(server.auth_headers(), vec![None]);
        // A base URL ending in /v1 is not doubled.
        let r = remote(format!("{}/v1/", server.base_url()));
        assert!(r.url().ends_with("/v1/embeddings") && !r.url().contains("/v1/v1"));
        assert!(call(&r).is_ok());
    });
}

#[test]
fn errors_map_to_transient_or_permanent() {
    within(LIMIT, || {
        let server = TestServer::start(Mode::Ok);
        let r = remote(server.base_url());
        let cases = [
            (Mode::Status(500), ErrorKind::Transient),
            (Mode::Status(503), ErrorKind::Transient),
            (Mode::Status(429), ErrorKind::Transient),
            (Mode::Status(400), ErrorKind::Permanent),
            (Mode::Status(401), ErrorKind::Permanent),
            (Mode::BadJson, ErrorKind::Permanent),
            (Mode::WrongCount, ErrorKind::Permanent),
            (
                Mode::Stall(Duration::from_millis(1500)),
                ErrorKind::Transient,
            ),
            (Mode::Hangup, ErrorKind::Transient),
        ];
        for (mode, kind) in cases {
            server.set_mode(mode);
            let e = call(&r).unwrap_err();
            assert_eq!(e.kind, kind, "{mode:?}: {e}");
            assert!(e.message.contains("/v1/embeddings"), "{e}");
        }
        let refused = remote(refused_url());
        assert_eq!(call(&refused).unwrap_err().kind, ErrorKind::Transient);
    });
}

#[test]
fn the_deadline_shortens_the_read_timeout() {
    within(LIMIT, || {
        // The server answers correctly after 1.5 s; the read timeout alone (5 s) would wait for
        // it, the 150 ms deadline must not.
        let server = TestServer::start(Mode::Stall(Duration::from_millis(1500)));
        let r = RemoteEmbedder::new(RemoteConfig {
            base_url: server.base_url(),
            api_key_env: None,
            read_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .unwrap();
        let e = r
            .embed(&texts(), Deadline::after(Duration::from_millis(150)))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        let passed = Deadline::after(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
        let e = r.embed(&texts(), passed).unwrap_err();
        assert!(e.message.contains("deadline"), "{e}");
    });
}

fn router_with_remote(server: &TestServer) -> Router<[String], Vec<Vec<f32>>> {
    let config = RouterConfig {
        breaker: BreakerConfig {
            failures: 3,
            open_for: Duration::from_millis(100),
            ..Default::default()
        },
        retry: RetryConfig {
            max_retries: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let gate = Arc::new(FixedGate {
        pressure: tier_router::PressureLevel::Elevated,
        available_bytes: 1 << 30,
    });
    Router::new(config, gate)
        .unwrap()
        .with_tier(TierSpec::new(
            "remote",
            Tier::Remote,
            Arc::new(remote(server.base_url())),
        ))
        .unwrap()
        .with_tier(TierSpec::new(
            "hashing",
            Tier::RuleBased,
            Arc::new(rule_based),
        ))
        .unwrap()
}

#[test]
fn breaker_opens_probes_and_closes_against_a_failing_server() {
    within(LIMIT, || {
        let server = TestServer::start(Mode::Status(503));
        let router = router_with_remote(&server);
        let transitions = Arc::new(Mutex::new(Vec::new()));
        let t = transitions.clone();
        router
            .breaker("remote")
            .unwrap()
            .on_transition(move |tr| t.lock().push((tr.from, tr.to, tr.reason)));
        let task = TaskFeatures::with_tokens(10);
        let input = texts();
        let deadline = || Deadline::after(Duration::from_secs(5));

        // Three failures: each served by the rule-based tier, the remote's failure recorded.
        for k in 0..3 {
            let s = router.serve(&task, &input[..], deadline()).unwrap();
            assert_eq!(s.tier, Tier::RuleBased, "call {k}");
            assert!(
                matches!(
                    &s.trail[0].outcome,
                    Outcome::Failed { error, .. } if error.kind == ErrorKind::Transient && error.message.contains("503")
                ),
                "{:?}",
                s.trail
            );
        }
        assert_eq!(
            router.breaker("remote").unwrap().state(),
            BreakerState::Open
        );
        assert_eq!(server.requests(), 3);

        // Open: the remote is skipped without a request, and route() says why.
        let s = router.serve(&task, &input[..], deadline()).unwrap();
        assert_eq!(s.tier, Tier::RuleBased);
        assert!(matches!(
            &s.trail[0].outcome,
            Outcome::Skipped(SkipReason::BreakerOpen(_))
        ));
        assert_eq!(server.requests(), 3);
        assert!(router.route(&task).to_string().contains("circuit open"));

        // The server stalls: after open_for the probe times out and the breaker opens again.
        server.set_mode(Mode::Stall(Duration::from_millis(1000)));
        std::thread::sleep(Duration::from_millis(120));
        let s = router.serve(&task, &input[..], deadline()).unwrap();
        assert_eq!(s.tier, Tier::RuleBased);
        assert_eq!(server.requests(), 4);
        assert_eq!(
            router.breaker("remote").unwrap().state(),
            BreakerState::Open
        );

        // The server recovers: the next probe succeeds and closes the breaker.
        server.set_mode(Mode::Ok);
        std::thread::sleep(Duration::from_millis(120));
        let s = router.serve(&task, &input[..], deadline()).unwrap();
        assert_eq!(s.tier, Tier::Remote);
        assert_eq!(s.response[1], vec![4.0, 1.0, 1.0]);
        assert_eq!(
            router.breaker("remote").unwrap().state(),
            BreakerState::Closed
        );
        let s = router.serve(&task, &input[..], deadline()).unwrap();
        assert_eq!(s.tier, Tier::Remote);

        use BreakerState::*;
        assert_eq!(
            transitions.lock().clone(),
            vec![
                (Closed, Open, TransitionReason::ConsecutiveFailures(3)),
                (Open, HalfOpen, TransitionReason::OpenElapsed),
                (HalfOpen, Open, TransitionReason::ProbeFailed),
                (Open, HalfOpen, TransitionReason::OpenElapsed),
                (HalfOpen, Closed, TransitionReason::ProbesSucceeded(1)),
            ]
        );
    });
}

#[test]
fn transient_errors_are_retried_permanent_ones_are_not() {
    within(LIMIT, || {
        let server = TestServer::start(Mode::Status(500));
        let config = RouterConfig {
            breaker: BreakerConfig {
                failures: 10,
                min_calls: 10,
                ..Default::default()
            },
            retry: RetryConfig {
                max_retries: 2,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(20),
                ..Default::default()
            },
            ..Default::default()
        };
        let gate = Arc::new(FixedGate::default());
        let router = Router::new(config, gate)
            .unwrap()
            .with_tier(TierSpec::new(
                "remote",
                Tier::Remote,
                Arc::new(remote(server.base_url())),
            ))
            .unwrap()
            .with_tier(TierSpec::new(
                "hashing",
                Tier::RuleBased,
                Arc::new(rule_based),
            ))
            .unwrap();
        let task = TaskFeatures::with_tokens(10);
        let input = texts();
        let s = router
            .serve(&task, &input[..], Deadline::after(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(server.requests(), 3, "1 attempt + 2 retries");
        assert!(matches!(
            s.trail[0].outcome,
            Outcome::Failed {
                attempts: 3,
                gave_up: GaveUp::RetriesExhausted,
                ..
            }
        ));

        server.set_mode(Mode::Status(400));
        let s = router
            .serve(&task, &input[..], Deadline::after(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(server.requests(), 4, "a permanent error is not retried");
        assert!(matches!(
            s.trail[0].outcome,
            Outcome::Failed {
                attempts: 1,
                gave_up: GaveUp::Permanent,
                ..
            }
        ));

        // A deadline shorter than the first backoff leaves no room for a retry.
        server.set_mode(Mode::Status(500));
        let router2 = Router::new(
            RouterConfig {
                retry: RetryConfig {
                    initial_backoff: Duration::from_secs(2),
                    max_backoff: Duration::from_secs(2),
                    ..Default::default()
                },
                ..Default::default()
            },
            Arc::new(FixedGate::default()),
        )
        .unwrap()
        .with_tier(TierSpec::new(
            "remote",
            Tier::Remote,
            Arc::new(remote(server.base_url())),
        ))
        .unwrap();
        let e = router2
            .serve(
                &task,
                &input[..],
                Deadline::after(Duration::from_millis(500)),
            )
            .unwrap_err();
        match e {
            tier_router::Error::Exhausted { trail } => assert!(matches!(
                trail[0].outcome,
                Outcome::Failed {
                    attempts: 1,
                    gave_up: GaveUp::Deadline,
                    ..
                }
            )),
            other => panic!("expected Exhausted, got {other}"),
        }
        assert_eq!(server.requests(), 5);
    });
}

/// A rule-based tier for the tests: three numbers per text, never fails.
fn rule_based(texts: &[String], _: Deadline) -> Result<Vec<Vec<f32>>, BackendError> {
    Ok(texts
        .iter()
        .map(|t| vec![t.len() as f32, 1.0, 0.0])
        .collect())
}
