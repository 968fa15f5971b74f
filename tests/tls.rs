//! TLS on both sides: the gateway's own https listener (HTTP/1.1 and HTTP/2 by ALPN), an https
//! upstream trusted through `ca_cert`, and HTTP/2 without TLS (h2c) to an upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_and_https_upstream_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let mock = MockUpstream::start_tls(&cert, &key).await;
    let mut config = format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        path_str(&cert),
        path_str(&key)
    );
    config.push_str(&upstream_toml(
        "secure",
        &format!("https://localhost:{}/v1", mock.addr.port()),
        &format!("ca_cert = \"{}\"", path_str(&cert)),
    ));
    config.push_str(&route_toml("echo", "secure", "echo", ""));
    let mut gw = GatewayProcess::start(&config);
    assert!(gw.log_text().contains("https://"), "{}", gw.log_text());

    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());
    for http2 in [false, true] {
        let mut builder = reqwest::Client::builder().add_root_certificate(root.clone());
        if !http2 {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let r = client
            .post(&url)
            .json(&user_request("echo", "over tls"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let expected = if http2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), expected);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "echo: over tls");
    }
    // The upstream connection negotiated HTTP/2 by ALPN.
    assert!(mock
        .state
        .versions
        .lock()
        .unwrap()
        .iter()
        .all(|v| *v == axum::http::Version::HTTP_2));

    // Plain http to the TLS listener does not get through.
    let plain = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            gw.addr.port()
        ))
        .json(&user_request("echo", "x"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_an_untrusted_certificate_is_a_502_not_a_crash() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let mock = MockUpstream::start_tls(&cert, &key).await;
    let mut config = upstream_toml(
        "secure",
        &format!("https://localhost:{}/v1", mock.addr.port()),
        "max_retries = 0",
    );
    config.push_str(&route_toml("echo", "secure", "echo", ""));
    let mut gw = GatewayProcess::start(&config);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&user_request("echo", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_with_prior_knowledge() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("h2", &mock.base_url(), "http2_prior_knowledge = true");
    config.push_str(&route_toml("echo", "h2", "echo", ""));
    let mut gw = GatewayProcess::start(&config);
    for stream in [false, true] {
        let mut body = user_request("echo", "h2c");
        body["stream"] = serde_json::json!(stream);
        let r = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("h2c"));
    }
    let versions = mock.state.versions.lock().unwrap().clone();
    assert_eq!(versions, vec![axum::http::Version::HTTP_2; 2]);
    assert!(gw.stop().success());
}
