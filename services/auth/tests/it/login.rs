//! Login: one answer for unknown email and wrong password, and the
//! per-email rate limit (kicks in, survives a restart, lifts).

use std::time::Duration;

use keel_auth::store::{LoginAttempt, Reservation};
use tonic::Code;

use crate::support::{Env, PASSWORD, Server, config, err, login_req};

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same() {
    let env = Env::new().await;
    let mut client = env.client();
    env.register("known@example.com").await;

    let wrong = err(client
        .login(login_req("known@example.com", "not the password"))
        .await);
    let unknown = err(client
        .login(login_req("unknown@example.com", "not the password"))
        .await);
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(wrong.message(), unknown.message());
    assert_eq!(wrong.message(), "invalid email or password");

    let status = err(client.login(login_req("known@example.com", "")).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = err(client.login(login_req("not an email", PASSWORD)).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("email"), "{status:?}");
}

#[tokio::test]
async fn repeated_failures_are_rate_limited_until_the_window_passes() {
    let window = Duration::from_secs(4);
    let env = Env::with(|c| {
        c.login.login_max_failures = 3;
        c.login.login_failure_window_secs = window.as_secs();
    })
    .await;
    let mut client = env.client();
    env.register("target@example.com").await;

    for _ in 0..3 {
        let status = err(client
            .login(login_req("target@example.com", "guess guess"))
            .await);
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // At the limit even the right password is refused, before any hashing.
    let status = err(client
        .login(login_req(" TARGET@example.com", PASSWORD))
        .await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Another email is not affected.
    let status = err(client.login(login_req("other@example.com", "guess")).await);
    assert_eq!(status.code(), Code::Unauthenticated);

    // A second replica (or a restart) on the same database sees the same count.
    let mut replica = Server::start({
        let mut c = config(&env.db, &env.key_file);
        c.login.login_max_failures = 3;
        c.login.login_failure_window_secs = window.as_secs();
        c
    })
    .await;
    let status = err(replica
        .client
        .login(login_req("target@example.com", PASSWORD))
        .await);
    assert_eq!(status.code(), Code::ResourceExhausted);

    // Once the window has passed (moved into the past rather than waited
    // for), the right password works again.
    env.rewind_login_windows(window + Duration::from_secs(1))
        .await;
    client
        .login(login_req("target@example.com", PASSWORD))
        .await
        .expect("limit lifted after the window");
    replica.stop().await;
}

#[tokio::test]
async fn a_successful_login_clears_the_failures() {
    let env = Env::with(|c| c.login.login_max_failures = 3).await;
    let mut client = env.client();
    env.register("forgetful@example.com").await;
    for _ in 0..2 {
        err(client
            .login(login_req("forgetful@example.com", "nope nope"))
            .await);
    }
    client
        .login(login_req("forgetful@example.com", PASSWORD))
        .await
        .unwrap();
    // The count starts again: three more failures are answered as such.
    for _ in 0..3 {
        let status = err(client
            .login(login_req("forgetful@example.com", "nope nope"))
            .await);
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = err(client
        .login(login_req("forgetful@example.com", PASSWORD))
        .await);
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn the_sweep_forgets_counters_whose_window_has_passed() {
    let env = Env::new().await;
    let store = keel_auth::store::Store::new(env.db.pool.clone());
    let window = Duration::from_secs(1);
    let email = keel_auth::domain::email_digest("swept@example.com");
    let reserve = || store.reserve_login_attempt(&email, 1, window);
    assert_eq!(reserve().await.unwrap(), Reservation::Granted);
    assert_eq!(reserve().await.unwrap(), Reservation::Busy);
    store
        .finish_login_attempt(&email, LoginAttempt::Failed)
        .await
        .unwrap();
    assert_eq!(reserve().await.unwrap(), Reservation::Refused);
    assert_eq!(store.sweep(window).await.unwrap().0, 0);
    env.rewind_login_windows(window + Duration::from_secs(1))
        .await;
    assert_eq!(store.sweep(window).await.unwrap().0, 1);
    assert_eq!(reserve().await.unwrap(), Reservation::Granted);
}

#[tokio::test]
async fn simultaneous_correct_logins_all_succeed() {
    let env = Env::with(|c| c.login.login_max_failures = 3).await;
    env.register("busy@example.com").await;
    let logins = (0..8).map(|_| {
        let mut client = env.client();
        async move { client.login(login_req("busy@example.com", PASSWORD)).await }
    });
    for result in futures::future::join_all(logins).await {
        result.expect("each of 8 simultaneous correct logins succeeds");
    }
    // Nothing was counted against the email.
    let mut client = env.client();
    for _ in 0..3 {
        let status = err(client
            .login(login_req("busy@example.com", "wrong wrong"))
            .await);
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn simultaneous_guesses_are_checked_no_more_than_the_limit() {
    let env = Env::with(|c| c.login.login_max_failures = 3).await;
    env.register("guessed@example.com").await;
    let guesses = (0..10).map(|i| {
        let mut client = env.client();
        async move {
            err(client
                .login(login_req(
                    "guessed@example.com",
                    &format!("guess number {i}"),
                ))
                .await)
            .code()
        }
    });
    let codes = futures::future::join_all(guesses).await;
    let checked = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    let limited = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!((checked, limited), (3, 7), "{codes:?}");
    let status = err(env
        .client()
        .login(login_req("guessed@example.com", PASSWORD))
        .await);
    assert_eq!(status.code(), Code::ResourceExhausted);
}
