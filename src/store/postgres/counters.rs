//! Counters shared by every replica, for limits that must not multiply with the number of
//! replicas (failed logins). Each step is one statement: the row lock of an upsert makes
//! concurrent steps on one key from any replica apply one after the other.

use super::{exec, one, Pg};
use crate::clock::Millis;
use crate::store::{CounterStep, StoreError};

impl Pg {
    pub(in crate::store) async fn counter(
        &self,
        key: &str,
        step: CounterStep,
    ) -> Result<(bool, Option<Millis>), StoreError> {
        let client = self.client().await?;
        let tat = |row: Option<tokio_postgres::Row>| row.map(|r| r.get::<_, i64>(0));
        match step {
            CounterStep::Take { now, interval, tolerance } => {
                let taken = one(
                    &client,
                    "INSERT INTO shared_counters AS c (key, tat) VALUES ($1, $2::bigint + $3::bigint)
                     ON CONFLICT (key) DO UPDATE SET tat = greatest(c.tat, $2) + $3
                         WHERE greatest(c.tat, $2) - $2 <= $4::bigint
                     RETURNING tat",
                    &[&key, &now, &interval, &tolerance],
                )
                .await?;
                if taken.is_some() {
                    return Ok((true, tat(taken)));
                }
                let sql = "SELECT tat FROM shared_counters WHERE key = $1";
                Ok((false, tat(one(&client, sql, &[&key]).await?)))
            }
            CounterStep::Peek => {
                let sql = "SELECT tat FROM shared_counters WHERE key = $1";
                Ok((true, tat(one(&client, sql, &[&key]).await?)))
            }
            CounterStep::Charge { now, amount } => {
                let row = one(
                    &client,
                    "INSERT INTO shared_counters AS c (key, tat) VALUES ($1, $2::bigint + $3::bigint)
                     ON CONFLICT (key) DO UPDATE SET tat = greatest(c.tat, $2) + $3
                     RETURNING tat",
                    &[&key, &now, &amount],
                )
                .await?;
                Ok((true, tat(row)))
            }
            CounterStep::Refund { now, amount } => {
                let row = one(
                    &client,
                    "UPDATE shared_counters SET tat = greatest(tat - $3::bigint, $2::bigint) WHERE key = $1
                     RETURNING tat",
                    &[&key, &now, &amount],
                )
                .await?;
                Ok((true, tat(row)))
            }
            CounterStep::Forget => {
                exec(&client, "DELETE FROM shared_counters WHERE key = $1", &[&key]).await?;
                Ok((true, None))
            }
        }
    }

    pub(in crate::store) async fn purge_counters(&self, now: Millis) -> Result<u64, StoreError> {
        let client = self.client().await?;
        exec(&client, "DELETE FROM shared_counters WHERE tat < $1", &[&now]).await
    }
}
