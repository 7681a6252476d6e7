-- 0004: an admin's invite waits for their security key; its token carries
-- the invitee's role until then.
ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT '';
