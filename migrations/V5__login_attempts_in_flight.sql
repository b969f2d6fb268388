-- Login attempts still being checked are counted apart from failures, so
-- concurrent correct logins for one email wait for each other instead of
-- being refused, while concurrent guesses still cannot pass the limit.
ALTER TABLE login_failures ADD COLUMN pending integer NOT NULL DEFAULT 0 CHECK (pending >= 0);
ALTER TABLE login_failures DROP CONSTRAINT login_failures_failures_check;
ALTER TABLE login_failures ADD CONSTRAINT login_failures_failures_check CHECK (failures >= 0);
