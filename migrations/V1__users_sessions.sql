-- Users and their sessions (auth service).

-- Emails are stored trimmed and lower-cased by the auth service (Unicode-aware,
-- in Rust), so the check only pins what Postgres can judge the same way.
CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL CHECK (email = btrim(email) AND length(email) BETWEEN 3 AND 254),
    display_name  text NOT NULL DEFAULT '' CHECK (length(display_name) <= 256),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Case-insensitive uniqueness (emails are stored lower-cased; this makes it a guarantee).
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- A session is one sign-in; its refresh tokens form a rotation family.
CREATE TABLE sessions (
    id             uuid PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revoked_reason text CHECK (revoked_reason IN ('logout', 'reuse')),
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id);

-- Refresh tokens are stored only as SHA-256 hashes. A used token stays (until
-- it expires) so that presenting it again is recognised as reuse.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id);
CREATE INDEX refresh_tokens_expires_at_idx ON refresh_tokens (expires_at);

-- Login attempts per email (by SHA-256 of the normalised email, so mistyped
-- addresses are not kept) in a fixed window that starts at the first failure:
-- shared by every replica and kept across restarts.
CREATE TABLE login_failures (
    email_hash        bytea PRIMARY KEY CHECK (length(email_hash) = 32),
    failures          integer NOT NULL CHECK (failures > 0),
    window_started_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_window_started_at_idx ON login_failures (window_started_at);
