//! Domain values to `keel.auth.v1` messages.

use keel_proto::auth::v1::{TokenPair, User};
use keel_shared::time::to_timestamp;

use crate::service::IssuedTokens;
use crate::store::UserRow;

pub fn user_proto(user: &UserRow) -> User {
    User {
        id: user.id.to_string(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        created_at: Some(to_timestamp(user.created_at)),
    }
}

pub fn tokens_proto(tokens: IssuedTokens) -> TokenPair {
    TokenPair {
        access_token: tokens.access_token,
        access_token_expires_at: Some(to_timestamp(tokens.access_token_expires_at)),
        refresh_token: tokens.refresh_token,
        refresh_token_expires_at: Some(to_timestamp(tokens.refresh_token_expires_at)),
    }
}
