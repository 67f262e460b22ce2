//! `src/http/` has no import cycle: its files form layers, each importing only files
//! below it (the order `src/http/mod.rs` lists). Read from the source: every
//! `super::<file>` and `crate::http::<file>` path of a file's production code (its
//! `#[cfg(test)]` module left out) is an arrow; a `super::<name>` that is not a file is an
//! arrow to `mod.rs`, whose own arrows are its `pub use`s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every file of `src/http` (by module name; `mod` for `mod.rs`) and its production code.
fn files() -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("src/http") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 name")
            .to_string();
        let text = std::fs::read_to_string(&path).expect("read");
        let production = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default()
            .to_string();
        out.insert(name, production);
    }
    out
}

/// The first path segment of every item of a use tree that starts right after
/// `super::` (`{a, b::{c, d}}` gives a and b; `a::b` gives a).
fn heads(tree: &str) -> Vec<String> {
    let tree = tree.trim_start();
    let Some(inner) = tree.strip_prefix('{') else {
        return vec![segment(tree)];
    };
    let mut out = Vec::new();
    let (mut depth, mut item) = (0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(segment(&item));
                item.clear();
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    out.push(segment(&item));
    out.retain(|s| !s.is_empty());
    out
}

fn segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Which files each file imports.
fn arrows(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (name, code) in files {
        let mut to = BTreeSet::new();
        for prefix in ["super::", "crate::http::"] {
            for (at, _) in code.match_indices(prefix) {
                let rest = &code[at + prefix.len()..];
                for head in heads(rest) {
                    let target = if files.contains_key(&head) {
                        head
                    } else if name == "mod" {
                        // `super::` in mod.rs leaves the folder.
                        continue;
                    } else {
                        // An item of mod.rs (a re-export or its own).
                        "mod".to_string()
                    };
                    if target != *name {
                        to.insert(target);
                    }
                }
            }
        }
        if name == "mod" {
            for line in code.lines() {
                if let Some(rest) = line.trim().strip_prefix("pub use ") {
                    let head = segment(rest.trim_start_matches("self::"));
                    if files.contains_key(&head) {
                        to.insert(head);
                    }
                }
            }
        }
        out.insert(name.clone(), to);
    }
    out
}

/// A cycle of `arrows`, if there is one, as the files along it (the first repeated at
/// the end).
fn cycle(arrows: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        at: &str,
        arrows: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(at.to_string(), Mark::Open);
        path.push(at.to_string());
        for next in arrows.get(at).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = path.iter().position(|p| p == next).unwrap_or(0);
                    let mut found = path[from..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                Mark::New => {
                    if let Some(found) = visit(next, arrows, marks, path) {
                        return Some(found);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(at.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for start in arrows.keys() {
        if marks.get(start).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(found) = visit(start, arrows, &mut marks, &mut Vec::new()) {
                return Some(found);
            }
        }
    }
    None
}

#[test]
fn src_http_has_no_import_cycle() {
    let files = files();
    assert!(files.len() >= 10, "src/http was not read: {files:?}");
    let arrows = arrows(&files);
    if let Some(found) = cycle(&arrows) {
        panic!(
            "import cycle in src/http: {} (arrows: {arrows:#?})",
            found.join(" -> ")
        );
    }
}

#[test]
fn the_reader_sees_arrows_and_the_checker_finds_a_cycle() {
    assert_eq!(heads("errors::{json, Body};"), ["errors"]);
    assert_eq!(
        heads("{body::{self, Limit}, state::AppState, validate};"),
        ["body", "state", "validate"]
    );
    let files: BTreeMap<String, String> = [
        ("mod", "pub use b::B;\n"),
        ("a", "use super::b::B;\n"),
        ("b", "fn f() { super::c::g() }\n"),
        (
            "c",
            "use crate::http::{a, b};\n#[cfg(test)]\nmod tests { use super::*; }\n",
        ),
    ]
    .into_iter()
    .map(|(n, c)| (n.to_string(), c.to_string()))
    .collect();
    let found_arrows = arrows(&files);
    assert_eq!(found_arrows["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(found_arrows["mod"], BTreeSet::from(["b".to_string()]));
    let found = cycle(&found_arrows).expect("a -> b -> c -> a");
    assert_eq!(found.first(), found.last());
    assert!(found.len() >= 3, "{found:?}");
    // Without c's arrows back up, the files form layers.
    let mut layered = files.clone();
    layered.insert("c".into(), "fn g() {}\n".into());
    assert_eq!(cycle(&arrows(&layered)), None);
}
