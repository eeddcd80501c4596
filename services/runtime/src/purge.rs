//! Deleting old rows a batch at a time (finished commands, inbox rows): short statements, so
//! the writers that share those tables never wait behind a long delete.

use std::future::Future;

use crate::DbError;

/// Runs `delete_batch` (which deletes at most `batch` rows and says how many) until a batch
/// comes back short, yielding to other tasks in between. Returns how many rows went, and the
/// error that stopped it early, if one did.
pub async fn delete_in_batches<F, Fut>(batch: u64, mut delete_batch: F) -> (u64, Option<DbError>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, DbError>>,
{
    let mut total = 0;
    loop {
        match delete_batch().await {
            Ok(deleted) => {
                total += deleted;
                if deleted < batch {
                    return (total, None);
                }
                tokio::task::yield_now().await;
            }
            Err(error) => return (total, Some(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deletes_until_a_batch_comes_back_short() {
        let mut batches = vec![Ok(10), Ok(10), Ok(3), Ok(10)].into_iter();
        let (deleted, error) =
            delete_in_batches(10, || std::future::ready(batches.next().unwrap_or(Ok(0)))).await;
        assert_eq!(deleted, 23);
        assert!(error.is_none());
        assert_eq!(
            batches.next().map(Result::ok),
            Some(Some(10)),
            "stopped after the short batch"
        );
    }

    #[tokio::test]
    async fn an_error_stops_it_with_what_went_before() {
        let mut batches = vec![Ok(10), Err(DbError::Invariant("down".into())), Ok(10)].into_iter();
        let (deleted, error) =
            delete_in_batches(10, || std::future::ready(batches.next().unwrap_or(Ok(0)))).await;
        assert_eq!(deleted, 10);
        assert!(matches!(error, Some(DbError::Invariant(_))));
    }
}
