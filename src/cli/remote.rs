//! `flywheel run`, `flywheel runs` and `flywheel rollout`: the flywheel controls of a running
//! gateway, over its HTTP API (they need its engines and its live routes).

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct Remote {
    /// The gateway's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API key with the admin scope (not needed on loopback by default).
    #[arg(long, env = "FLYWHEEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The route to run the flywheel for.
    #[arg(long)]
    pub route: String,
    /// Hyperparameters (JSON object, NeMo shape) merged over the route's for this run.
    #[arg(long)]
    pub hyperparameters: Option<String>,
    /// Wait for the run to finish and print its decision.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub remote: Remote,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    /// One run in full.
    pub id: Option<String>,
    #[arg(long)]
    pub route: Option<String>,
    #[command(flatten)]
    pub remote: Remote,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Where each flywheel route's rollout stands, with its transitions.
    Status {
        route: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Move the candidate one stage on (shadow → canary → champion).
    Promote(RolloutAction),
    /// Return to the rollout before the candidate (or before the last promotion).
    Rollback(RolloutAction),
    /// Hold automatic transitions (guards still roll back).
    Pause(RolloutAction),
    /// Lift a hold.
    Resume(RolloutAction),
    /// Let a candidate awaiting approval start its rollout (shadow first).
    Approve(RolloutAction),
    /// Turn down a candidate awaiting approval.
    Reject(RolloutAction),
}

#[derive(Args, Debug)]
pub struct RolloutAction {
    pub route: String,
    /// Recorded with the transition.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub remote: Remote,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// One JSON request to the gateway; a non-2xx answer is an error carrying the gateway's message.
fn call(
    remote: &Remote,
    method: http::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let url = format!("{}{path}", remote.url.trim_end_matches('/'));
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("'{url}' is not a valid URL"))?;
    if uri.scheme_str() != Some("http") {
        anyhow::bail!("--url must be an http:// address of the gateway (https is not supported by the CLI yet)");
    }
    let mut req = http::Request::builder().method(method).uri(uri);
    if let Some(k) = &remote.api_key {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let payload = match body {
        Some(b) => {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(payload))?;
    runtime()?.block_on(async {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let resp = client
            .request(req)
            .await
            .with_context(|| format!("cannot reach the gateway at {}", remote.url))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            anyhow::bail!("the gateway answered {status}: {msg}");
        }
        Ok(v)
    })
}

fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn run_command(a: RunArgs) -> anyhow::Result<()> {
    let mut body = json!({"route": a.route});
    if let Some(h) = &a.hyperparameters {
        body["hyperparameters"] =
            serde_json::from_str(h).context("--hyperparameters must be a JSON object")?;
    }
    let run = call(
        &a.remote,
        http::Method::POST,
        "/v1/flywheel/runs",
        Some(body),
    )?;
    let id = run["id"].as_str().unwrap_or_default().to_string();
    if !a.wait {
        return print(&run);
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    loop {
        let r = call(
            &a.remote,
            http::Method::GET,
            &format!("/v1/flywheel/runs/{id}"),
            None,
        )?;
        bar.set_message(format!("run {id}: {}", r["stage"].as_str().unwrap_or("?")));
        if r["status"] != "running" {
            bar.finish_and_clear();
            return print(&r);
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

pub fn runs_command(a: RunsArgs) -> anyhow::Result<()> {
    let path = match (&a.id, &a.route) {
        (Some(id), _) => format!("/v1/flywheel/runs/{id}"),
        (None, Some(r)) => format!("/v1/flywheel/runs?route={r}"),
        (None, None) => "/v1/flywheel/runs".to_string(),
    };
    let v = call(&a.remote, http::Method::GET, &path, None)?;
    if a.id.is_some() {
        return print(&v);
    }
    println!(
        "{:<40} {:<20} {:<10} {:<10} decision",
        "id", "route", "status", "trigger"
    );
    for r in v["data"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:<20} {:<10} {:<10} {}",
            r["id"].as_str().unwrap_or(""),
            r["route"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["trigger"]["kind"].as_str().unwrap_or(""),
            r["decision"]["reason"]
                .as_str()
                .unwrap_or(r["stage"].as_str().unwrap_or(""))
        );
    }
    Ok(())
}

pub fn rollout_command(c: RolloutCommand) -> anyhow::Result<()> {
    let (action, a) = match c {
        RolloutCommand::Status { route, remote } => {
            let path = match route {
                Some(r) => format!("/v1/flywheel/routes/{r}"),
                None => "/v1/flywheel/routes".into(),
            };
            return print(&call(&remote, http::Method::GET, &path, None)?);
        }
        RolloutCommand::Promote(a) => ("promote", a),
        RolloutCommand::Rollback(a) => ("rollback", a),
        RolloutCommand::Pause(a) => ("pause", a),
        RolloutCommand::Resume(a) => ("resume", a),
        RolloutCommand::Approve(a) => ("approve", a),
        RolloutCommand::Reject(a) => ("reject", a),
    };
    let v = call(
        &a.remote,
        http::Method::POST,
        &format!("/v1/flywheel/routes/{}/{action}", a.route),
        Some(json!({"reason": a.reason})),
    )?;
    println!(
        "route {}: {} (champion {})",
        a.route,
        v["stage"].as_str().unwrap_or("?"),
        v["champion"]
    );
    Ok(())
}
