//! `edgechat store copy`: a single box's redb file into an empty PostgreSQL database, every
//! table, in one transaction that commits only when the rows counted on both sides agree.

use super::accounts::{insert_key, insert_user};
use super::conversations::{insert_conversation, insert_messages};
use super::jobs::{insert_jobs, recount};
use super::{exec, one, Pg};
use crate::clock::Millis;
use crate::store::accounts::RefreshRecord;
use crate::store::tables::{self, decode};
use crate::store::{ApiKeyRecord, Conversation, Job, Message, Redb, StoreError, User};
use deadpool_postgres::GenericClient;
use redb::{ReadableTable, ReadableTableMetadata};
use uuid::Uuid;

/// The tables copied, in the order foreign keys need, and how many rows each received.
pub type CopyReport = Vec<(&'static str, u64)>;

/// The tables of records (not of counts or the schema version), by their PostgreSQL names.
pub(super) const TABLES: [&str; 7] = [
    "users",
    "api_keys",
    "refresh_tokens",
    "revoked_families",
    "conversations",
    "messages",
    "jobs",
];

impl Pg {
    pub(in crate::store) async fn copy_from(
        &self,
        source: &Redb,
    ) -> Result<CopyReport, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for table in TABLES {
            let sql = format!("SELECT 1 FROM {table} LIMIT 1");
            if one(&tx, &sql, &[]).await?.is_some() {
                return Err(StoreError::Db(format!(
                    "{}: table {table} already holds rows; store copy only fills an empty database (create a new one, or drop edgechat's tables)",
                    self.shown
                )));
            }
        }
        let users: Vec<User> = all(source, tables::USERS, "users")?;
        for u in &users {
            insert_user(&tx, u).await?;
        }
        let keys: Vec<ApiKeyRecord> = all(source, tables::API_KEYS, "api_keys")?;
        for k in &keys {
            insert_key(&tx, k).await?;
        }
        for (hash, r) in refresh_tokens(source)? {
            exec(
                &tx,
                "INSERT INTO refresh_tokens (hash, user_id, family, expires_at, rotated)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&hash, &r.user_id, &r.family, &r.expires_at, &r.rotated],
            )
            .await?;
        }
        for (family, at) in revoked_families(source)? {
            exec(
                &tx,
                "INSERT INTO revoked_families (family, revoked_at) VALUES ($1, $2)",
                &[&family, &at],
            )
            .await?;
        }
        let conversations: Vec<Conversation> = all(source, tables::CONVERSATIONS, "conversations")?;
        for c in &conversations {
            insert_conversation(&tx, c).await?;
            // One conversation's messages at a time: memory stays flat however long the file.
            insert_messages(&tx, c.id, &messages(source, c.id)?).await?;
        }
        for chunk in all::<Job>(source, tables::JOBS, "jobs")?.chunks(500) {
            insert_jobs(&tx, chunk).await?;
        }
        recount(&tx).await?;
        let report = verify(&tx, source).await?;
        tx.commit().await?;
        Ok(report)
    }
}

/// Rows on both sides, table by table; an error naming the first that differs.
async fn verify<C: GenericClient>(c: &C, source: &Redb) -> Result<CopyReport, StoreError> {
    let expected = source.read(|tx| {
        Ok([
            tx.open_table(tables::USERS)?.len()?,
            tx.open_table(tables::API_KEYS)?.len()?,
            tx.open_table(tables::REFRESH_TOKENS)?.len()?,
            tx.open_table(tables::REVOKED_FAMILIES)?.len()?,
            tx.open_table(tables::CONVERSATIONS)?.len()?,
            tx.open_table(tables::MESSAGES)?.len()?,
            tx.open_table(tables::JOBS)?.len()?,
        ])
    })?;
    let mut report = Vec::new();
    for (table, want) in TABLES.into_iter().zip(expected) {
        let sql = format!("SELECT count(*) FROM {table}");
        let got = one(c, &sql, &[]).await?.map_or(0, |r| r.get::<_, i64>(0)) as u64;
        if got != want {
            return Err(StoreError::Db(format!(
                "table {table}: {want} rows in the file, {got} copied; nothing was committed"
            )));
        }
        report.push((table, got));
    }
    Ok(report)
}

/// Every record of a table keyed by id.
fn all<T: serde::de::DeserializeOwned>(
    source: &Redb,
    table: redb::TableDefinition<u128, &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    source.read(|tx| {
        let mut out = Vec::new();
        for row in tx.open_table(table)?.iter()? {
            out.push(decode(name, row?.1.value())?);
        }
        Ok(out)
    })
}

fn refresh_tokens(source: &Redb) -> Result<Vec<(Vec<u8>, RefreshRecord)>, StoreError> {
    source.read(|tx| {
        let mut out = Vec::new();
        for row in tx.open_table(tables::REFRESH_TOKENS)?.iter()? {
            let (hash, record) = row?;
            out.push((hash.value().to_vec(), decode("refresh_tokens", record.value())?));
        }
        Ok(out)
    })
}

fn revoked_families(source: &Redb) -> Result<Vec<(Uuid, Millis)>, StoreError> {
    source.read(|tx| {
        let mut out = Vec::new();
        for row in tx.open_table(tables::REVOKED_FAMILIES)?.iter()? {
            let (family, at) = row?;
            out.push((Uuid::from_u128(family.value()), at.value()));
        }
        Ok(out)
    })
}

/// A conversation's messages in order (their sequence numbers run from 0: messages are only
/// ever appended, and deleted with their conversation).
fn messages(source: &Redb, conversation: Uuid) -> Result<Vec<Message>, StoreError> {
    let id = conversation.as_u128();
    source.read(|tx| {
        let mut out = Vec::new();
        for row in tx.open_table(tables::MESSAGES)?.range((id, 0)..=(id, u32::MAX))? {
            out.push(decode("messages", row?.1.value())?);
        }
        Ok(out)
    })
}
