//! Domain values to `keel.auth.v1` messages.

use keel_proto::auth::v1::{ApiKey, TokenPair, User};
use keel_shared::time::{opt_timestamp, to_timestamp};

use crate::service::IssuedTokens;
use crate::store::{ApiKeyRow, UserRow};

pub(crate) fn user_proto(user: &UserRow) -> User {
    User {
        id: user.id.to_string(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        created_at: Some(to_timestamp(user.created_at)),
    }
}

pub(crate) fn tokens_proto(tokens: IssuedTokens) -> TokenPair {
    TokenPair {
        access_token: tokens.access_token,
        access_token_expires_at: Some(to_timestamp(tokens.access_token_expires_at)),
        refresh_token: tokens.refresh_token,
        refresh_token_expires_at: Some(to_timestamp(tokens.refresh_token_expires_at)),
    }
}

pub(crate) fn api_key_proto(key: &ApiKeyRow) -> ApiKey {
    ApiKey {
        id: key.id.to_string(),
        name: key.name.clone(),
        prefix: key.prefix.clone(),
        created_at: Some(to_timestamp(key.created_at)),
        expires_at: opt_timestamp(key.expires_at),
        last_used_at: opt_timestamp(key.last_used_at),
    }
}
