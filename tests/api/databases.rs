use agsync::pb::{CreateDatabaseRequest, DeleteDatabaseRequest, ListDatabasesRequest};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn create_list_and_delete() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();

    let db = create_db(&mut c, "cars").await;
    assert_eq!(
        (
            db.name.as_str(),
            db.sync_key.as_str(),
            db.doc_count,
            db.update_seq
        ),
        ("cars", "cars", 0, 0)
    );
    let cal = c
        .create_database(CreateDatabaseRequest {
            name: "calendar".into(),
            sync_key: "org.devnexus.sync.UserCalendar".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .database
        .unwrap();
    assert_eq!(cal.sync_key, "org.devnexus.sync.UserCalendar");

    assert_status(
        c.create_database(CreateDatabaseRequest {
            name: "cars".into(),
            sync_key: String::new(),
        })
        .await,
        Code::AlreadyExists,
        "\"cars\" already exists",
    );

    let a = put(&mut c, "cars", "a", "", json!({"n": 1})).await.unwrap();
    let b = put(&mut c, "cars", "b", "", json!({"n": 2})).await.unwrap();
    c.delete(agsync::pb::DeleteRequest {
        request_id: String::new(),
        database: "cars".into(),
        id: "a".into(),
        rev: a.rev,
        notify_aliases: vec![],
    })
    .await
    .unwrap();

    let list = c
        .list_databases(ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .databases;
    let summary: Vec<_> = list
        .iter()
        .map(|d| (d.name.as_str(), d.doc_count, d.update_seq))
        .collect();
    assert_eq!(summary, vec![("calendar", 0, 0), ("cars", 1, b.seq + 1)]);

    c.delete_database(DeleteDatabaseRequest {
        name: "cars".into(),
    })
    .await
    .unwrap();
    assert_status(
        get(&mut c, "cars", "b").await,
        Code::NotFound,
        "database \"cars\" does not exist",
    );
    assert_status(
        c.delete_database(DeleteDatabaseRequest {
            name: "cars".into(),
        })
        .await,
        Code::NotFound,
        "does not exist",
    );

    // A database created again under the same name starts empty.
    let again = create_db(&mut c, "cars").await;
    assert_eq!((again.doc_count, again.update_seq), (0, 0));
    assert_status(
        get(&mut c, "cars", "b").await,
        Code::NotFound,
        "document \"b\"",
    );
    // ...and seqs keep growing: they are global and never reused.
    let next = put(&mut c, "cars", "b", "", json!({})).await.unwrap();
    assert!(next.seq > b.seq + 1, "{} after {}", next.seq, b.seq);
    assert_eq!(generation(&next.rev), 1);
}

#[tokio::test]
async fn invalid_names_and_keys_are_rejected() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    let cases: &[(&str, &str, &str)] = &[
        ("", "", "name: a database name is required"),
        ("Cars", "", "must start with a lowercase letter"),
        ("1cars", "", "must start with a lowercase letter"),
        ("_users", "", "must start with a lowercase letter"),
        ("cars!", "", "contains '!'"),
        ("ca rs", "", "contains ' '"),
        (
            &"a".repeat(239),
            "",
            "239 characters long; the maximum is 238",
        ),
        (
            "cars",
            "has space",
            "sync_key: sync key \"has space\" contains ' '",
        ),
        (
            "cars",
            &"k".repeat(257),
            "257 bytes long; the maximum is 256",
        ),
    ];
    for (name, key, needle) in cases {
        assert_status(
            c.create_database(CreateDatabaseRequest {
                name: (*name).into(),
                sync_key: (*key).into(),
            })
            .await,
            Code::InvalidArgument,
            needle,
        );
    }
    // Nothing was created by the bad requests; the longest legal name works.
    let list = c.list_databases(ListDatabasesRequest {}).await.unwrap();
    assert!(list.into_inner().databases.is_empty());
    create_db(&mut c, &"a".repeat(238)).await;
    create_db(&mut c, "a0_$()+/-").await;
    assert_status(
        c.delete_database(DeleteDatabaseRequest { name: "Bad".into() })
            .await,
        Code::InvalidArgument,
        "must start with a lowercase letter",
    );
}
