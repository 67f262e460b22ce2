//! The documentation stays usable: README.md is a short page that starts with the two
//! commands, links to every page of `docs/`, and every relative link in README.md and
//! `docs/*.md` leads to a file of this repository (and, with `#anchor`, to a heading of
//! that file).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Longest README.md, in lines.
const README_MAX_LINES: usize = 250;
/// The two commands must start within this many lines of README.md.
const COMMANDS_WITHIN: usize = 30;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README.md and every `docs/*.md`.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no page");
    pages.extend(docs);
    pages
}

/// The lines of a Markdown text outside fenced code blocks, with their 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut in_fence = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence {
            out.push((i + 1, line));
        }
    }
    out
}

/// A line without its inline code spans (`` `…` ``).
fn without_code_spans(line: &str) -> String {
    line.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, part)| part)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The targets of the inline links `[text](target)` of a Markdown text, with their lines.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            // `(target "title")`: the target is the first word.
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push((n, target.trim_matches(['<', '>']).to_string()));
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces
/// made `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown text's headings (a repeated heading gets `-1`, `-2`, … as on
/// GitHub).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let mut anchor = base.clone();
        let mut i = 1;
        while seen.contains(&anchor) {
            anchor = format!("{base}-{i}");
            i += 1;
        }
        seen.insert(anchor);
    }
    seen
}

fn is_external(target: &str) -> bool {
    target.contains("://") || target.starts_with("mailto:")
}

#[test]
fn every_relative_link_leads_to_a_file_of_the_repository_and_its_heading() {
    let root = root().canonicalize().expect("repository root");
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = read(&page);
        let name = page
            .strip_prefix(&root)
            .unwrap_or(&page)
            .display()
            .to_string();
        for (line, target) in links(&text) {
            if target.is_empty() {
                broken.push(format!("{name}:{line}: an empty link"));
                continue;
            }
            if is_external(&target) {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                page.parent().expect("page's folder").join(path)
            };
            let Ok(file) = file.canonicalize() else {
                broken.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            };
            if !file.starts_with(&root) {
                broken.push(format!("{name}:{line}: {target}: outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_markdown = file.extension().is_some_and(|x| x == "md");
                if !is_markdown || !anchors(&read(&file)).contains(anchor) {
                    broken.push(format!("{name}:{line}: {target}: no heading #{anchor}"));
                }
            }
        }
    }
    assert!(
        checked >= 20,
        "only {checked} relative links found: is the parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_short_and_starts_with_the_two_commands() {
    let readme = read(&root().join("README.md"));
    let lines: Vec<&str> = readme.lines().collect();
    assert!(
        lines.len() <= README_MAX_LINES,
        "README.md has {} lines, at most {README_MAX_LINES} wanted: move details to docs/",
        lines.len()
    );
    // The first code block, within the first lines, holds both commands.
    let open = lines
        .iter()
        .position(|l| l.starts_with("```"))
        .expect("README.md has no code block");
    assert!(
        open < COMMANDS_WITHIN,
        "README.md's first code block starts on line {}, after line {COMMANDS_WITHIN}",
        open + 1
    );
    let block: Vec<&str> = lines[open + 1..]
        .iter()
        .take_while(|l| !l.starts_with("```"))
        .copied()
        .collect();
    for command in ["cargo run --release", "scripts/test.sh"] {
        assert!(
            block.iter().any(|l| l.trim_start().starts_with(command)),
            "README.md's first code block lacks `{command}`: {block:?}"
        );
    }
}

#[test]
fn the_readme_links_to_every_page_of_docs() {
    let readme = read(&root().join("README.md"));
    let linked: BTreeSet<String> = links(&readme)
        .into_iter()
        .map(|(_, t)| t.split('#').next().unwrap_or("").to_string())
        .collect();
    for page in pages().into_iter().skip(1) {
        let name = format!("docs/{}", page.file_name().expect("name").to_string_lossy());
        assert!(linked.contains(&name), "README.md does not link to {name}");
    }
}

#[test]
fn the_link_checker_reads_links_and_headings_as_github_does() {
    let text = "# Title\n\
                See [a](docs/a.md#get-metricbatch) and `[not](a link)`.\n\
                ```sh\n[neither](x.md)\n# not a heading\n```\n\
                ## POST /metric/batch\n## GET /health, GET /ready\n## Title\n";
    let found: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(found, ["docs/a.md#get-metricbatch"]);
    let anchors = anchors(text);
    for anchor in [
        "title",
        "post-metricbatch",
        "get-health-get-ready",
        "title-1",
    ] {
        assert!(anchors.contains(anchor), "{anchor} not in {anchors:?}");
    }
    assert!(!anchors.contains("not-a-heading"));
}
