//! ARCHITECTURE.md's entry-points table stays true: every RPC of the contract
//! has one row, every file a row names exists, the handler file defines the
//! RPC's handler, and the test file calls the RPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message as _;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `SendLoves` -> `send_loves`: tonic's name for the handler and the
/// client method.
fn snake(rpc: &str) -> String {
    let mut out = String::new();
    for (i, c) in rpc.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The paths a cell names: every `` `…` `` span that looks like a file path.
fn paths(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.ends_with(".rs") || span.ends_with('/'))
        .map(str::to_owned)
        .collect()
}

/// The rows of the table under `## Entry points`, by RPC (`Service/Method`).
fn table() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(repo_root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Entry points")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Entry points` section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        assert_eq!(cells.len(), 5, "a row has five cells: {line}");
        let rpc = cells[0].trim_matches('`').to_owned();
        assert!(
            rows.insert(rpc.clone(), cells).is_none(),
            "{rpc} has two rows"
        );
    }
    rows
}

#[test]
fn every_rpc_has_a_true_row_in_the_entry_points_table() {
    let set = prost_types::FileDescriptorSet::decode(livemesh_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut rows = table();
    let root = repo_root();
    let mut methods = 0;
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                methods += 1;
                let rpc = format!("{}/{}", service.name(), method.name());
                let cells = rows.remove(&rpc).unwrap_or_else(|| {
                    panic!("{rpc} has no row in ARCHITECTURE.md's entry points")
                });
                for cell in &cells[1..] {
                    for path in paths(cell) {
                        assert!(
                            root.join(&path).exists(),
                            "{rpc}: {path} named in ARCHITECTURE.md does not exist"
                        );
                    }
                }
                let name = snake(method.name());
                let handler = paths(&cells[1]);
                assert!(!handler.is_empty(), "{rpc}: the handler cell names no file");
                let defines = handler.iter().any(|path| {
                    std::fs::read_to_string(root.join(path))
                        .is_ok_and(|src| src.contains(&format!("fn {name}(")))
                });
                assert!(defines, "{rpc}: no `fn {name}(` in {handler:?}");
                let tests = paths(&cells[4]);
                assert!(!tests.is_empty(), "{rpc}: the tests cell names no file");
                let calls = tests.iter().any(|path| {
                    std::fs::read_to_string(root.join(path))
                        .is_ok_and(|src| src.contains(&format!(".{name}(")))
                });
                assert!(calls, "{rpc}: no test in {tests:?} calls `{name}`");
            }
        }
    }
    assert!(methods >= 19, "only {methods} methods found");
    assert!(
        rows.is_empty(),
        "rows for RPCs the contract does not have: {:?}",
        rows.keys()
    );
}
