//! Rows into domain values, once per row type, by column name, for every
//! driver: sqlx's SQLite and PostgreSQL rows and rusqlite's (the SQLite
//! writer and replay reader). Each query selects the columns its row type
//! names; the decoders here are the only code that turns a row into a value
//! (elsewhere only a query's own bookkeeping column is read, by name through
//! `Columns`: a batched Get's `n`, the tailer's `pruned_through`). Must not:
//! read a table's column by position, or build a domain value from a row
//! elsewhere.

use std::collections::BTreeMap;

use sqlx::Row;

use super::batch::{Current, DbRow, StoredRequest};
use super::{parse_stored_rev as stored_rev, to_u64};
use crate::domain::{
    Alias, Body, Change, DatabaseInfo, DbName, DocId, Document, Error, Event, Result, SyncKey,
};

/// A result row read by column name, whatever the driver.
pub(super) trait Columns {
    fn int(&self, name: &str) -> Result<i64>;
    fn flag(&self, name: &str) -> Result<bool>;
    fn text(&self, name: &str) -> Result<&str>;
    fn bytes(&self, name: &str) -> Result<&[u8]>;
    /// NULL is `None` (a LEFT JOIN that found nothing, a body not asked for).
    fn opt_int(&self, name: &str) -> Result<Option<i64>>;
    fn opt_flag(&self, name: &str) -> Result<Option<bool>>;
    fn opt_text(&self, name: &str) -> Result<Option<&str>>;
}

/// sqlx's rows: both backends' read queries and PostgreSQL's writer.
macro_rules! sqlx_columns {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, name: &str) -> Result<i64> {
                Ok(self.try_get(name)?)
            }
            fn flag(&self, name: &str) -> Result<bool> {
                Ok(self.try_get(name)?)
            }
            fn text(&self, name: &str) -> Result<&str> {
                Ok(self.try_get(name)?)
            }
            fn bytes(&self, name: &str) -> Result<&[u8]> {
                Ok(self.try_get(name)?)
            }
            fn opt_int(&self, name: &str) -> Result<Option<i64>> {
                Ok(self.try_get(name)?)
            }
            fn opt_flag(&self, name: &str) -> Result<Option<bool>> {
                Ok(self.try_get(name)?)
            }
            fn opt_text(&self, name: &str) -> Result<Option<&str>> {
                Ok(self.try_get(name)?)
            }
        }
    };
}
sqlx_columns!(sqlx::sqlite::SqliteRow);
sqlx_columns!(sqlx::postgres::PgRow);

/// A statement's column names, resolved once: rusqlite looks a name up
/// among the statement's columns on every `get(name)` (a C string and a
/// case-insensitive compare per column), which cost replay a third of its
/// throughput; a hot loop reads its rows through `on` instead.
pub(super) struct ColumnMap(Vec<String>);

impl ColumnMap {
    pub(super) fn of(statement: &rusqlite::Statement<'_>) -> ColumnMap {
        ColumnMap(
            statement
                .column_names()
                .into_iter()
                .map(str::to_ascii_lowercase)
                .collect(),
        )
    }

    /// `row` read by name through this map.
    pub(super) fn on<'r>(&'r self, row: &'r rusqlite::Row<'r>) -> Mapped<'r> {
        Mapped {
            row,
            map: self,
            next: std::cell::Cell::new(0),
        }
    }
}

/// A rusqlite row with its statement's `ColumnMap`.
pub(super) struct Mapped<'r> {
    row: &'r rusqlite::Row<'r>,
    map: &'r ColumnMap,
    /// Where the next lookup starts: the decoders read columns in the
    /// order queries select them, so a lookup is one comparison.
    next: std::cell::Cell<usize>,
}

impl Mapped<'_> {
    fn index(&self, name: &str) -> Result<usize> {
        let columns = &self.map.0;
        let start = self.next.get().min(columns.len());
        let found = (start..columns.len())
            .chain(0..start)
            .find(|&i| columns[i] == name)
            .ok_or_else(|| Error::Storage(format!("no column {name:?} in the query").into()))?;
        self.next.set(found + 1);
        Ok(found)
    }
}

impl Columns for Mapped<'_> {
    fn int(&self, name: &str) -> Result<i64> {
        Ok(self.row.get(self.index(name)?)?)
    }
    fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.row.get(self.index(name)?)?)
    }
    fn text(&self, name: &str) -> Result<&str> {
        self.row
            .get_ref(self.index(name)?)?
            .as_str()
            .map_err(|e| Error::Storage(Box::new(e)))
    }
    fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.row
            .get_ref(self.index(name)?)?
            .as_blob()
            .map_err(|e| Error::Storage(Box::new(e)))
    }
    fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.row.get(self.index(name)?)?)
    }
    fn opt_flag(&self, name: &str) -> Result<Option<bool>> {
        Ok(self.row.get(self.index(name)?)?)
    }
    fn opt_text(&self, name: &str) -> Result<Option<&str>> {
        self.row
            .get_ref(self.index(name)?)?
            .as_str_or_null()
            .map_err(|e| Error::Storage(Box::new(e)))
    }
}

/// rusqlite's rows: the SQLite writer's and the replay reader's.
impl Columns for rusqlite::Row<'_> {
    fn int(&self, name: &str) -> Result<i64> {
        Ok(self.get(name)?)
    }
    fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.get(name)?)
    }
    fn text(&self, name: &str) -> Result<&str> {
        self.get_ref(name)?
            .as_str()
            .map_err(|e| Error::Storage(Box::new(e)))
    }
    fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.get_ref(name)?
            .as_blob()
            .map_err(|e| Error::Storage(Box::new(e)))
    }
    fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.get(name)?)
    }
    fn opt_flag(&self, name: &str) -> Result<Option<bool>> {
        Ok(self.get(name)?)
    }
    fn opt_text(&self, name: &str) -> Result<Option<&str>> {
        self.get_ref(name)?
            .as_str_or_null()
            .map_err(|e| Error::Storage(Box::new(e)))
    }
}

/// `events(seq, sync_key, database, doc_id, rev, deleted, aliases,
/// attributes)`: '' stands for "none" in the text columns; aliases and
/// attributes are JSON.
pub(super) fn event(row: &impl Columns) -> Result<Event> {
    // Read in the order the queries select the columns (see `Mapped`).
    let present = |column: &str| -> Result<Option<&str>> {
        let value = row.text(column)?;
        Ok((!value.is_empty()).then_some(value))
    };
    let seq = to_u64(row.int("seq")?);
    let sync_key = SyncKey::parse("stored sync_key", row.text("sync_key")?)?;
    let database = present("database")?
        .map(|d| DbName::parse("stored database", d))
        .transpose()?;
    let id = present("doc_id")?
        .map(|id| DocId::parse("stored id", id))
        .transpose()?;
    let rev = present("rev")?.map(stored_rev).transpose()?;
    let deleted = row.flag("deleted")?;
    let aliases: Vec<String> =
        serde_json::from_str(row.text("aliases")?).map_err(|e| Error::Storage(Box::new(e)))?;
    let attributes: BTreeMap<String, String> =
        serde_json::from_str(row.text("attributes")?).map_err(|e| Error::Storage(Box::new(e)))?;
    Ok(Event {
        seq,
        sync_key,
        database,
        id,
        rev,
        deleted,
        aliases: Alias::parse_list("stored aliases", &aliases)?,
        attributes,
    })
}

/// `databases(name, sync_key, doc_count, update_seq, created_seq)`.
pub(super) fn database(row: &impl Columns) -> Result<DatabaseInfo> {
    Ok(DatabaseInfo {
        name: DbName::parse("stored name", row.text("name")?)?,
        sync_key: SyncKey::parse("stored sync_key", row.text("sync_key")?)?,
        doc_count: to_u64(row.int("doc_count")?),
        update_seq: to_u64(row.int("update_seq")?),
        created_seq: to_u64(row.int("created_seq")?),
    })
}

/// `databases(id, created_seq)`: which instance of a name a read sees.
pub(super) fn instance(row: &impl Columns) -> Result<(i64, u64)> {
    Ok((row.int("id")?, to_u64(row.int("created_seq")?)))
}

/// `databases(id, name, sync_key)`, as the writer keeps them.
pub(super) fn db_row(row: &impl Columns) -> Result<(DbName, DbRow)> {
    Ok((
        DbName::parse("stored name", row.text("name")?)?,
        DbRow {
            id: row.int("id")?,
            sync_key: SyncKey::parse("stored sync_key", row.text("sync_key")?)?,
        },
    ))
}

/// `docs(rev, deleted, seq)` of the document `id`, as the writer checks
/// revisions against it.
pub(super) fn doc_state(id: DocId, row: &impl Columns) -> Result<(DocId, Current)> {
    Ok((
        id,
        Current {
            rev: stored_rev(row.text("rev")?)?,
            deleted: row.flag("deleted")?,
            seq: to_u64(row.int("seq")?),
            body: None,
        },
    ))
}

/// `docs(rev, body, seq)` of the document `id`.
pub(super) fn document(id: DocId, row: &impl Columns) -> Result<Document> {
    Ok(Document {
        id,
        rev: stored_rev(row.text("rev")?)?,
        body: Body::from_canonical_json(row.text("body")?)?,
        seq: to_u64(row.int("seq")?),
    })
}

/// A point read, `databases LEFT JOIN docs`: `db_id` NULL if the database
/// does not exist; `rev`, `deleted`, `body`, `seq` NULL if the document
/// does not. `None` if the database is missing, else the live document or
/// `DocumentNotFound`.
pub(super) fn lookup(
    database: &DbName,
    id: &DocId,
    row: &impl Columns,
) -> Result<Option<Result<Document>>> {
    if row.opt_int("db_id")?.is_none() {
        return Ok(None);
    }
    Ok(Some(match row.opt_flag("deleted")? {
        Some(false) => Ok(document(id.clone(), row)?),
        _ => Err(Error::DocumentNotFound {
            database: database.to_string(),
            id: id.to_string(),
        }),
    }))
}

/// The `id` column: a document id.
pub(super) fn doc_id(row: &impl Columns) -> Result<DocId> {
    DocId::parse("stored id", row.text("id")?)
}

/// A Changes row: `docs(id, rev, seq, deleted, body)`, `body` NULL unless
/// asked for and live.
pub(super) fn change(row: &impl Columns) -> Result<Change> {
    Ok(Change {
        id: doc_id(row)?,
        rev: stored_rev(row.text("rev")?)?,
        seq: to_u64(row.int("seq")?),
        deleted: row.flag("deleted")?,
        body: row
            .opt_text("body")?
            .map(Body::from_canonical_json)
            .transpose()?,
    })
}

/// A recorded request_id: `requests(fingerprint, reply)`.
pub(super) fn request(row: &impl Columns) -> Result<StoredRequest> {
    Ok(StoredRequest {
        fingerprint: row.bytes("fingerprint")?.to_vec(),
        reply: row.text("reply")?.to_owned(),
    })
}

/// A `counters(name, value)` row (see `Counters::from_rows`).
pub(super) fn counter(row: &impl Columns) -> Result<(String, i64)> {
    Ok((row.text("name")?.to_owned(), row.int("value")?))
}
