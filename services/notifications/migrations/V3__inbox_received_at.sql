-- The consumer now purges inbox rows past the bus's inbox retention (WAYBILL_INBOX_RETENTION)
-- by received_at; rows arrive in time order, so a BRIN index finds old ones for almost
-- nothing per insert (waybill_events::INBOX_TABLE_SQL has it for new inboxes).
CREATE INDEX inbox_received_at ON notifications.inbox USING brin (received_at);
