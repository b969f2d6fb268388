-- API keys for programs and agents acting as their user (auth service), and
-- the new reasons a session can end.

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    -- The first characters of the secret, shown in listings.
    prefix       text NOT NULL,
    -- SHA-256 of the whole secret: the secret itself is never stored.
    key_hash     bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);

-- Logout, reuse of a rotated refresh token, LogoutAll, ChangePassword.
ALTER TABLE sessions DROP CONSTRAINT sessions_revoked_reason_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_revoked_reason_check
    CHECK (revoked_reason IN ('logout', 'reuse', 'logout_all', 'password_changed'));
