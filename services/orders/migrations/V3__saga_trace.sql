-- The trace of the call that started each saga (W3C traceparent; '' when it was not traced),
-- so that a saga resumed by the driver, after a crash or a deferral, starts a trace linked to
-- the PlaceOrder (or CancelOrder) that began it. A link, not a parent: the original call has
-- long answered, and the resumed run is caused by the driver's timer.
ALTER TABLE orders.sagas ADD COLUMN traceparent text NOT NULL DEFAULT '';
