//! The parts of `src/` import each other without a loop (issue 9): each part is a
//! top-level module (`supervisor`, `runtime`, `balance`, `via`, ...), an edge is a
//! `crate::part` path in its code (doc comments and unit tests left out), and the
//! graph must be acyclic, so that each part can be read knowing only those below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`, with its path.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file: comment lines dropped, and nothing from `#[cfg(test)]` on.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The parts a piece of code names: `crate::x`, and the first segment of each item of a
/// `crate::{x, y::{z, w}}` group (nested groups included).
fn named(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level items, up to its matching brace.
            let (mut depth, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.insert(first_segment(&item));
        } else {
            out.insert(first_segment(rest));
        }
    }
    out
}

/// The leading identifier of a path.
fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn the_parts_of_src_import_each_other_without_a_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.iter().next().expect("a component").to_string_lossy();
        let part = first.trim_end_matches(".rs").to_string();
        if part == "lib" || part == "main" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        graph
            .entry(part.clone())
            .or_default()
            .extend(named(&code(&text)));
    }
    let parts: BTreeSet<String> = graph.keys().cloned().collect();
    for (part, uses) in graph.iter_mut() {
        uses.retain(|u| parts.contains(u) && u != part);
    }
    for part in ["supervisor", "runtime", "balance", "via", "worker", "cli"] {
        assert!(
            graph.contains_key(part),
            "src/{part} is gone: update this test"
        );
    }
    assert!(
        graph["via"].contains("supervisor"),
        "the edges are found: {graph:?}"
    );

    // Depth-first search for a back edge; report the loop it closes.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(at) = path.iter().position(|p| p == node) {
            panic!("import loop: {} -> {node}", path[at..].join(" -> "));
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_string());
        for next in &graph[node] {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for part in graph.keys() {
        visit(part, &graph, &mut Vec::new(), &mut done);
    }
    for (part, uses) in &graph {
        println!(
            "{part} -> {}",
            uses.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
}
