//! The console's gRPC clients: auth (sign in, refresh, users), jobs
//! (AdminService) and memory (MemoryAdminService). Channels connect on
//! first use, so the console starts whether or not the services are up.

use std::time::Duration;

use keel_proto::admin::v1::admin_service_client::AdminServiceClient;
use keel_proto::admin::v1::memory_admin_service_client::MemoryAdminServiceClient;
use keel_proto::admin::v1::user_admin_service_client::UserAdminServiceClient;
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_shared::StartupError;
use tonic::transport::Channel;

use crate::config::Config;

#[derive(Clone)]
pub(crate) struct Backends {
    auth: Channel,
    jobs: Channel,
    memory: Channel,
}

impl Backends {
    pub(crate) fn new(config: &Config) -> Result<Self, StartupError> {
        Ok(Self {
            auth: channel("KEEL_AUTH_URL", &config.auth_url, config)?,
            jobs: channel("KEEL_JOBS_URL", &config.jobs_url, config)?,
            memory: channel("KEEL_MEMORY_URL", &config.memory_url, config)?,
        })
    }

    pub(crate) fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.auth.clone())
    }

    pub(crate) fn users(&self) -> UserAdminServiceClient<Channel> {
        UserAdminServiceClient::new(self.auth.clone())
    }

    pub(crate) fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.jobs.clone())
    }

    pub(crate) fn memory(&self) -> MemoryAdminServiceClient<Channel> {
        MemoryAdminServiceClient::new(self.memory.clone())
    }
}

fn channel(var: &'static str, url: &str, config: &Config) -> Result<Channel, StartupError> {
    let endpoint = keel_shared::grpc_client::client_endpoint(url, &config.tls)
        .map_err(|reason| StartupError::InvalidVar { var, reason })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// `message` with `authorization: Bearer <access_token>` (marked sensitive,
/// so it is never logged).
pub(crate) fn authed<T>(message: T, access_token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(mut value) =
        format!("Bearer {access_token}").parse::<tonic::metadata::MetadataValue<_>>()
    {
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
    }
    keel_shared::telemetry::inject_trace_context(request.metadata_mut());
    request
}
