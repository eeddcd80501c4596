-- Messages sent with SendNotification are about no order and come from no event: the caller's
-- request id makes a repeat a no-op instead.
ALTER TABLE notifications.notifications
    ALTER COLUMN order_id DROP NOT NULL,
    ALTER COLUMN event_id DROP NOT NULL,
    ADD COLUMN request_id text;

CREATE UNIQUE INDEX notifications_by_request ON notifications.notifications (customer_id, request_id)
    WHERE request_id IS NOT NULL;
