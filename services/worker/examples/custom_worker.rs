//! A team's own worker binary: the built-in kinds plus one of its own.
//!
//! Same flags and `KEEL_*` variables as `keel-worker` (see `--help`):
//!
//! ```sh
//! KEEL_WORKER_TOKEN=... cargo run -p keel-worker --example custom_worker
//! ```

use clap::Parser;
use keel_worker::{Config, Handler, HandlerError, JobContext, Registry};
use serde_json::{Value, json};

/// `word-count`: payload `{"text": "..."}`, output `{"words": N}`.
struct WordCount;

#[async_trait::async_trait]
impl Handler for WordCount {
    async fn run(&self, ctx: JobContext) -> Result<Value, HandlerError> {
        let text = ctx.payload["text"]
            .as_str()
            .ok_or_else(|| HandlerError::Permanent("payload.text: required".into()))?;
        Ok(json!({ "words": text.split_whitespace().count() }))
    }
}

#[tokio::main]
async fn main() {
    let config = Config::parse();
    let registry = Registry::with_builtins()
        .register("word-count", WordCount)
        // Small handlers can be closures; long ones should watch ctx.cancel.
        .register_fn("shout", |ctx: JobContext| async move {
            let text = ctx.payload["text"].as_str().unwrap_or_default();
            Ok(json!({ "text": text.to_uppercase() }))
        });
    let result = async {
        let telemetry = keel_shared::telemetry::init_service("custom_worker", &config.runtime)?;
        let listener = keel_shared::server::bind(config.health_addr).await?;
        let shutdown = keel_shared::shutdown::on_signal();
        let result = keel_worker::run_with(config, registry, listener, shutdown).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    keel_shared::error::exit_on_error("custom_worker", result);
}
