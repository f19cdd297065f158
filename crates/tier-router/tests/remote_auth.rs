//! The API key is read from the configured environment variable and sent as a bearer token.
//! (Alone in its test binary: it sets an environment variable.)

mod common;

use std::time::Duration;

use common::server::{Mode, TestServer};
use common::within;
use tier_router::{Deadline, RemoteConfig, RemoteEmbedder};

#[test]
fn api_key_comes_from_the_named_variable() {
    within(Duration::from_secs(20), || {
        let server = TestServer::start(Mode::Ok);
        // SAFETY-free in edition 2021; this binary runs no other test thread.
        std::env::set_var("TIER_ROUTER_TEST_KEY", "sk-test-123");
        let r = RemoteEmbedder::new(RemoteConfig {
            base_url: server.base_url(),
            api_key_env: Some("TIER_ROUTER_TEST_KEY".into()),
            read_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .unwrap();
        assert!(
            !format!("{r:?}").contains("sk-test"),
            "the key is not printed"
        );
        r.embed(&["x".to_string()], Deadline::none()).unwrap();
        let unset = RemoteEmbedder::new(RemoteConfig {
            base_url: server.base_url(),
            api_key_env: Some("TIER_ROUTER_TEST_KEY_UNSET".into()),
            ..Default::default()
        })
        .unwrap();
        unset.embed(&["y".to_string()], Deadline::none()).unwrap();
        assert_eq!(
            server.auth_headers(),
            vec![Some("Bearer sk-test-123".to_string()), None]
        );
    });
}
