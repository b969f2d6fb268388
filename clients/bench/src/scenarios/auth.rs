//! The auth paths: Login (argon2id by design) and GetCurrentUser.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use keel_proto::auth::v1::{GetCurrentUserRequest, LoginRequest};

use super::drive::{Limit, authed, drive};
use super::{Ctx, PASSWORD};
use crate::stats::Stats;

pub(super) async fn login(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, cores, auth_client) = (&cx.opts, cx.cores, cx.auth_client());
    let email = cx.email.clone();
    let (ac, email) = (auth_client.clone(), Arc::new(email.clone()));
    // argon2 is the point of this path: bound concurrency to the cores.
    let mut s = drive(
        "auth-login",
        cores * 2,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, email) = (ac(i), email.clone());
            async move {
                client
                    .login(LoginRequest {
                        email: email.to_string(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    })
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    s.note = format!(
        "{:.1} logins/s per core {}",
        s.ops_per_sec() / cores as f64,
        s.note
    );
    Ok(Some(s))
}

pub(super) async fn read(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, token) = (&cx.opts, cx.opts.concurrency, &cx.token);
    let auth_client = cx.auth_client();
    let (ac, tk) = (auth_client.clone(), token.clone());
    let mut s = drive(
        "auth-read",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk) = (ac(i), tk.clone());
            async move {
                client
                    .get_current_user(authed(
                        &tk,
                        GetCurrentUserRequest {
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    s.note = format!("GetCurrentUser: JWT verify + one row {}", s.note);
    Ok(Some(s))
}
