use keel_auth::Config;

#[tokio::main]
async fn main() {
    keel_shared::server::healthcheck_command("127.0.0.1:50051").await;
    let config = keel_shared::config::parse_config::<Config>();
    let result = async {
        let telemetry = keel_shared::telemetry::init_service("keel-auth", &config.runtime)?;
        let listener = keel_shared::server::bind(config.listen_addr).await?;
        let result = keel_auth::run(config, listener, keel_shared::shutdown::on_signal()).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    keel_shared::error::exit_on_error("keel-auth", result);
}
