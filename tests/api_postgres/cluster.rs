//! Several agsync nodes on one PostgreSQL database.

use crate::helpers::*;

#[tokio::test]
async fn placeholder_until_cluster_tests() {}
