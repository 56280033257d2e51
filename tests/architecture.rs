//! Keeps docs/ARCHITECTURE.md's crate graph in step with the manifests, as
//! protocol_doc.rs does for PROTOCOL.md: the table marked
//! `<!-- table: crate-deps -->` must list exactly each workspace crate's
//! workspace dependencies (normal ones; optional ones marked so).

use std::collections::BTreeMap;
use std::process::Command;

const DOC: &str = include_str!("../docs/ARCHITECTURE.md");

/// crate -> sorted dependencies ("name" or "name (optional)") per the doc.
fn documented() -> BTreeMap<String, Vec<String>> {
    let marker = "<!-- table: crate-deps -->";
    let start = DOC.find(marker).expect("ARCHITECTURE.md has the crate-deps table");
    DOC[start + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.trim_start().starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim().trim_matches('|').split('|').map(str::trim).collect();
            let mut deps: Vec<String> = cells[1]
                .split(", ")
                .filter(|d| !d.is_empty())
                .map(|d| match d.split_once(" (optional") {
                    Some((name, _)) => format!("{name} (optional)"),
                    None => d.to_string(),
                })
                .collect();
            deps.sort();
            (cells[0].to_string(), deps)
        })
        .collect()
}

/// The same, from `cargo metadata`.
fn actual() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let members: Vec<&str> = packages.iter().map(|p| p["name"].as_str().unwrap()).collect();
    packages
        .iter()
        .map(|p| {
            let mut deps: Vec<String> = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null() && members.contains(&d["name"].as_str().unwrap()))
                .map(|d| {
                    let name = d["name"].as_str().unwrap();
                    if d["optional"].as_bool() == Some(true) {
                        format!("{name} (optional)")
                    } else {
                        name.to_string()
                    }
                })
                .collect();
            deps.sort();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn the_documented_crate_graph_is_the_real_one() {
    assert_eq!(documented(), actual(), "docs/ARCHITECTURE.md's crate-deps table is stale");
}

#[test]
fn device_and_host_never_depend_on_each_other() {
    let graph = actual();
    let depends = |a: &str, b: &str| graph[a].iter().any(|d| d.starts_with(b));
    assert!(!depends("pnm-device", "pnm-host"));
    assert!(!depends("pnm-host", "pnm-device"));
    assert!(graph["pnm-protocol"].is_empty(), "the protocol crate depends on no other");
}

/// An engine that links the driver library compiles only what the driver
/// needs: no CLI, no logging setup, no config parser, no firmware model.
#[test]
fn the_driver_library_links_no_tool() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "pnm-host", "-e", "normal", "--prefix", "none", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    for tool in ["clap ", "tracing-subscriber ", "toml ", "pnm-firmware ", "serde_json ", "half "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(tool)),
            "pnm-host's dependency tree holds {tool}:\n{tree}"
        );
    }
}

/// The driver library is layered: no module imports one that imports it
/// back, directly or around a longer loop (registers and mailbox, then DMA
/// buffers, queues, the queue session, the device, KV and Top-K, async).
#[test]
fn the_driver_library_has_no_module_cycle() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("host-driver/src");
    let mut uses: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_stem().and_then(|n| n.to_str()) else { continue };
        if path.extension().is_none_or(|e| e != "rs") || name == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut deps: Vec<String> = text
            .match_indices("crate::")
            .map(|(at, _)| {
                text[at + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect()
            })
            .filter(|d: &String| !d.is_empty() && d != name)
            .collect();
        deps.sort();
        deps.dedup();
        uses.insert(name.to_string(), deps);
    }
    assert!(uses.len() >= 10, "found the modules: {:?}", uses.keys());
    // Depth-first search for a path from a module back to itself.
    fn reaches(
        uses: &BTreeMap<String, Vec<String>>,
        from: &str,
        to: &str,
        seen: &mut Vec<String>,
    ) -> bool {
        for next in uses.get(from).into_iter().flatten() {
            if next == to {
                return true;
            }
            if !seen.contains(next) {
                seen.push(next.clone());
                if reaches(uses, next, to, seen) {
                    return true;
                }
            }
        }
        false
    }
    for module in uses.keys() {
        assert!(
            !reaches(&uses, module, module, &mut Vec::new()),
            "host-driver/src/{module}.rs is in an import cycle: {uses:#?}"
        );
    }
}
