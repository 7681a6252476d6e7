-- 0003: TakeNonce prunes expired nonces on every posture report.
CREATE INDEX nonces_expires_at ON nonces(expires_at);
