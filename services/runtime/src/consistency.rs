//! Read-your-writes on replicas. A write hands its caller a consistency token: a WAL position
//! on the primary at or after the write's commit. A read that carries the token is served by a
//! replica only once that replica has replayed past it, otherwise by the primary — so the
//! caller sees its write without every read going to the primary.

use crate::{Client, Db, DbError};

/// A WAL position (`pg_lsn` text, `16/B374D848`), opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyToken(String);

impl ConsistencyToken {
    /// Reads a token a client sent back; `None` if it is not one this service issued.
    pub fn parse(text: &str) -> Option<Self> {
        let (high, low) = text.split_once('/')?;
        let hex = |part: &str| {
            (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit())
        };
        (hex(high) && hex(low)).then(|| Self(text.to_owned()))
    }

    /// The token's text, for a response.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Db {
    /// A token covering every write committed on the primary so far (call it after the
    /// write's commit).
    pub async fn consistency_token(&self) -> Result<ConsistencyToken, DbError> {
        let client = self.primary().await?;
        let statement = client
            .prepare_cached("SELECT pg_current_wal_lsn()::text")
            .await?;
        let lsn: String = client.query_one(&statement, &[]).await?.try_get(0)?;
        Ok(ConsistencyToken(lsn))
    }

    /// A connection for a read that must reflect `token` (any replica without one): a
    /// replica that has replayed past it, or else the primary.
    pub async fn replica_after(&self, token: Option<&ConsistencyToken>) -> Result<Client, DbError> {
        let client = self.replica().await?;
        let Some(token) = token else {
            return Ok(client);
        };
        let statement = client
            .prepare_cached("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn")
            .await?;
        // NULL on a primary (the replica pool may have fallen back to it): current by
        // definition.
        let caught_up: Option<bool> = client
            .query_one(&statement, &[&token.as_str()])
            .await?
            .try_get(0)?;
        if caught_up == Some(false) {
            tracing::debug!(
                token = token.as_str(),
                "replica behind the token; reading the primary"
            );
            return self.primary().await;
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lsns_parse() {
        assert!(ConsistencyToken::parse("16/B374D848").is_some());
        assert!(ConsistencyToken::parse("0/0").is_some());
        for bad in ["", "16", "/1", "1/", "x/1", "1/2/3", "123456789/1", "1/ 2"] {
            assert_eq!(ConsistencyToken::parse(bad), None, "{bad:?}");
        }
    }
}
