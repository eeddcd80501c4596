//! The transactional outbox (emitting side) and the inbox (consuming side), as tables each
//! service creates in its own schema.
//!
//! A service copies [`OUTBOX_TABLE_SQL`] (if it emits events) and [`INBOX_TABLE_SQL`] (if it
//! consumes them) into one of its migrations, with `{schema}` replaced by its schema name
//! ([`table_sql`] does the replacing). The queries in this crate expect exactly these columns.

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use waybill_runtime::DbError;

use crate::event::{Event, headers_to_json, is_identifier, with_trace_context};

/// The outbox of schema `{schema}`: events written in the same transaction as the state
/// change they announce, until the relay moves them to the bus. Ids are UUIDv7, so the relay
/// publishes in id order, which is creation order.
pub const OUTBOX_TABLE_SQL: &str = "\
CREATE TABLE {schema}.outbox (
    id         uuid        PRIMARY KEY,
    topic      text        NOT NULL,
    key        text        NOT NULL,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
";

/// The inbox of schema `{schema}`: one row per event a subscription has handled, written in
/// the handler's transaction, so an event delivered twice is handled once.
///
/// Rows are never needed again once the bus can no longer redeliver the event: the consumer
/// purges them by `received_at` after the bus's inbox retention. Rows arrive in time order,
/// so a BRIN index finds the old ones for almost nothing per insert.
pub const INBOX_TABLE_SQL: &str = "\
CREATE TABLE {schema}.inbox (
    subscription text        NOT NULL,
    event_id     uuid        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, event_id)
);
CREATE INDEX inbox_received_at ON {schema}.inbox USING brin (received_at);
";

/// `template` ([`OUTBOX_TABLE_SQL`] or [`INBOX_TABLE_SQL`]) for `schema`.
pub fn table_sql(template: &str, schema: &str) -> String {
    template.replace("{schema}", schema)
}

/// The LISTEN/NOTIFY channel that announces committed outbox rows of `schema`.
pub fn channel(schema: &str) -> String {
    format!("waybill_outbox_{schema}")
}

/// Appends `event` to `schema`'s outbox through `client`, which should be the transaction
/// that makes the change the event announces.
///
/// It also notifies the relay; Postgres delivers the notification at commit, and not at all on
/// rollback, so the relay wakes exactly when there is something committed to move.
///
/// The event carries the current span's trace context in its headers (`traceparent`,
/// `tracestate`, `baggage`), unless it has one already, so that the consumer's span
/// continues the trace of the change that emitted it.
pub async fn append(
    client: &impl GenericClient,
    schema: &str,
    event: &Event,
) -> Result<(), DbError> {
    let row = OutboxRow::new(schema, event)?;
    let statement = format!(
        "WITH {} SELECT 1",
        OutboxRow::cte(schema, "(SELECT 1) AS always", 1)
    );
    // Through the connection's statement cache: one round trip, no parse, on every append
    // after a connection's first.
    client
        .execute(&client.prepare_cached(&statement).await?, &row.params())
        .await?;
    Ok(())
}

/// An event to append from inside a statement that also makes the change it announces: the
/// change and its event in one round trip, atomic without an explicit transaction.
///
/// ```text
/// let row = OutboxRow::new("orders", &event)?;
/// let sql = format!("WITH confirmed AS (UPDATE … RETURNING *), {} SELECT … FROM confirmed",
///                   row.cte("confirmed", 3));
/// // parameters: $1 and $2 for the update, then row.params() from $3
/// ```
pub struct OutboxRow {
    id: uuid::Uuid,
    topic: String,
    key: String,
    payload: Vec<u8>,
    headers: String,
    created_at: chrono::DateTime<chrono::Utc>,
    channel: String,
}

impl OutboxRow {
    /// `event` for `schema`'s outbox, with the current span's trace context (see [`append`]).
    pub fn new(schema: &str, event: &Event) -> Result<Self, DbError> {
        check_schema(schema)?;
        Ok(Self {
            id: event.id,
            topic: event.topic.clone(),
            key: event.key.clone(),
            payload: event.payload.clone(),
            headers: headers_to_json(&with_trace_context(&event.headers)),
            created_at: event.created_at,
            channel: channel(schema),
        })
    }

    /// A data-modifying CTE named `appended` (to put in a `WITH` list) that inserts an event
    /// into `schema`'s outbox if `gate` — a `FROM` item, typically an earlier CTE of the
    /// statement — has any row, and notifies the relay (delivered at commit). Its parameters
    /// are `$first` to `$first + 6`, bound to [`Self::params`] of the row made for the same
    /// schema. The text depends on nothing else: build the statement once.
    pub fn cte(schema: &str, gate: &str, first: usize) -> String {
        let p = |n: usize| format!("${}", first + n);
        format!(
            "appended AS (
                 INSERT INTO {schema}.outbox (id, topic, key, payload, headers, created_at)
                 SELECT {id}::uuid, {topic}::text, {key}::text, {payload}::bytea,
                        {headers}::text::jsonb, {created_at}::timestamptz
                 WHERE EXISTS (SELECT 1 FROM {gate})
                 RETURNING pg_notify({channel}::text, '')
             )",
            schema = schema,
            id = p(0),
            topic = p(1),
            key = p(2),
            payload = p(3),
            headers = p(4),
            created_at = p(5),
            channel = p(6),
        )
    }

    /// The CTE's parameter values, in order.
    pub fn params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.id,
            &self.topic,
            &self.key,
            &self.payload,
            &self.headers,
            &self.created_at,
            &self.channel,
        ]
    }
}

/// Rejects a schema name that is not a plain identifier (it is spliced into SQL).
pub(crate) fn check_schema(schema: &str) -> Result<(), DbError> {
    if is_identifier(schema) {
        Ok(())
    } else {
        Err(DbError::Config(format!(
            "invalid schema name {schema:?}: use lowercase letters, digits and _"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_the_schema() {
        let sql = table_sql(OUTBOX_TABLE_SQL, "orders");
        assert!(sql.starts_with("CREATE TABLE orders.outbox ("));
        assert!(sql.contains("DEFAULT '{}'"), "only {{schema}} is replaced");
        assert!(table_sql(INBOX_TABLE_SQL, "delivery").starts_with("CREATE TABLE delivery.inbox"));
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(check_schema("orders").is_ok());
        assert!(check_schema("orders.outbox; --").is_err());
    }
}
