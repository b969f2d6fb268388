#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("healthcheck") {
        let addr = args
            .next()
            .unwrap_or_else(|| keel_console::health::DEFAULT_ADDR.to_string());
        std::process::exit(if keel_console::health::probe(&addr).await {
            0
        } else {
            1
        });
    }
    let config = keel_shared::config::parse_config::<keel_console::Config>();
    let result = async {
        let telemetry = keel_shared::telemetry::init_service("keel-console", &config.runtime)?;
        let listener = keel_shared::server::bind(config.addr).await?;
        let result = keel_console::run(config, listener, keel_shared::shutdown::on_signal()).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    keel_shared::error::exit_on_error("keel-console", result);
}
