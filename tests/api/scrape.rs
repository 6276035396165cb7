//! Scraping `/metrics` of a server started with `--metrics-listen`, and
//! reading its series (the metrics tests of both backends).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::ProcessServer;

/// One scrape: each series (name and sorted labels) and its value.
pub struct Scrape {
    /// The HTTP status line.
    pub status: String,
    series: BTreeMap<String, f64>,
    /// The page as served.
    pub text: String,
}

impl Scrape {
    /// The value of `name` with exactly `labels` (None if absent).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels: Vec<_> = labels.to_vec();
        labels.sort_unstable();
        let key = series_key(
            name,
            &labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>(),
        );
        self.series.get(&key).copied()
    }

    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} not in /metrics:\n{}", self.text))
    }
}

fn series_key(name: &str, labels: &[(String, String)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// `GET path` on the metrics listener, with an optional bearer token; the
/// series are parsed only from a 200 answer.
pub async fn get_with(addr: SocketAddr, path: &str, token: Option<&str>) -> Scrape {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let authorization = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n{authorization}\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head.lines().next().unwrap_or_default().to_owned();
    let mut series = BTreeMap::new();
    let page = if status.contains(" 200 ") { body } else { "" };
    for line in page.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (left, value) = line.rsplit_once(' ').expect("series value");
        let (name, labels) = match left.split_once('{') {
            Some((name, rest)) => {
                let mut labels: Vec<(String, String)> = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").expect("label");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                labels.sort_unstable();
                (name, labels)
            }
            None => (left, Vec::new()),
        };
        series.insert(
            series_key(name, &labels),
            value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}")),
        );
    }
    Scrape {
        status,
        series,
        text: body.to_owned(),
    }
}

/// `/metrics` of `srv` (started with `--metrics-listen`), which must answer 200.
pub async fn scrape(srv: &ProcessServer) -> Scrape {
    let scrape = get_with(
        srv.metrics_addr.expect("--metrics-listen"),
        "/metrics",
        None,
    )
    .await;
    assert!(scrape.status.contains("200"), "{}", scrape.status);
    scrape
}
