//! Embedded SQL migrations, one schema per service.
//!
//! Each service owns a Postgres schema and ships its migrations inside its crate (refinery's
//! `embed_migrations!`). The history table lives in that schema, so services migrate
//! independently, and an advisory lock per schema lets several replicas of a service start at
//! once without racing.

use tokio_postgres::NoTls;

use crate::DbError;

/// A service's schema and its embedded migrations.
#[derive(Clone, Copy)]
pub struct Schema {
    /// The Postgres schema the service owns; no other service reads its tables.
    pub name: &'static str,
    /// Returns the service's refinery runner (from `embed_migrations!`).
    pub runner: fn() -> refinery::Runner,
}

/// Applies every pending migration of `schemas` on the database at `primary_url`.
pub async fn run(primary_url: &str, schemas: &[Schema]) -> Result<(), DbError> {
    let config: tokio_postgres::Config = primary_url
        .parse()
        .map_err(|e| DbError::Config(format!("invalid database URL: {e}")))?;
    let (mut client, connection) = config.connect(NoTls).await?;
    let connection = tokio::spawn(connection);

    for schema in schemas {
        let lock_key = format!("waybill.migrate.{}", schema.name);
        client
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key])
            .await?;
        let result = migrate_schema(&mut client, schema).await;
        client
            .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
            .await?;
        result?;
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}

async fn migrate_schema(
    client: &mut tokio_postgres::Client,
    schema: &Schema,
) -> Result<(), DbError> {
    // The history table lives in the schema, so the schema must exist before refinery looks.
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", schema.name))
        .await?;
    let report = (schema.runner)()
        .set_migration_table_name(format!("{}.schema_history", schema.name))
        .run_async(client)
        .await
        .map_err(|e| DbError::Config(format!("migrating schema {}: {e}", schema.name)))?;
    for migration in report.applied_migrations() {
        tracing::info!(schema = schema.name, migration = %migration, "applied migration");
    }
    Ok(())
}
