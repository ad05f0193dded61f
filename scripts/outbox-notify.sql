-- Optional wake-up for qx-relay (relay.notify_channel = "qx_outbox"): one pg_notify per inserting statement,
-- so the relay publishes at once instead of at its next poll. Producers need no change; the relay works
-- without it. Rename the channel here and in the relay's config together.
CREATE OR REPLACE FUNCTION qx_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('qx_outbox', '');
  RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS qx_outbox_notify ON qx_outbox_events;
CREATE TRIGGER qx_outbox_notify AFTER INSERT ON qx_outbox_events
  FOR EACH STATEMENT EXECUTE FUNCTION qx_outbox_notify();
