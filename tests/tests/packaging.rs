//! The host Debian package's cargo-deb metadata (host-shim/Cargo.toml): every asset it
//! lists exists, the binaries are the crate's, and every conffile is an installed asset.
//! (Building the .deb needs `cargo install cargo-deb`, which CI does not spend time on.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use agentlab_tests::workspace_root;

/// (source, destination) of each `assets` entry.
fn assets(manifest: &str) -> Vec<(String, String)> {
    let section = manifest.split("[package.metadata.deb]").nth(1).expect("[package.metadata.deb] is missing");
    let list = section.split("assets = [").nth(1).unwrap().split("\n]").next().unwrap();
    list.lines()
        .filter(|l| l.trim_start().starts_with("[\""))
        .map(|l| {
            let fields: Vec<&str> = l.split('"').collect();
            (fields[1].to_owned(), fields[3].to_owned())
        })
        .collect()
}

#[test]
fn the_deb_metadata_lists_existing_files_binaries_unit_config_and_profiles() {
    let crate_dir = workspace_root().join("host-shim");
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let assets = assets(&manifest);
    let sources: Vec<&str> = assets.iter().map(|(s, _)| s.as_str()).collect();
    for binary in ["agentlabd", "agentlab"] {
        assert!(sources.contains(&format!("target/release/{binary}").as_str()), "{binary}");
        assert!(manifest.contains(&format!("[[bin]]\nname = \"{binary}\"")), "{binary} is not a binary of the crate");
    }
    for (source, dest) in &assets {
        if !source.starts_with("target/") {
            assert!(crate_dir.join(source).is_file(), "asset {source} does not exist");
        }
        assert!(!dest.starts_with('/'), "cargo-deb destinations are relative: {dest}");
    }
    for (needed, dest) in [
        ("../host/systemd/agentlabd.service", "lib/systemd/system/agentlabd.service"),
        ("../host/default/agentlabd", "etc/default/agentlabd"),
        ("../profiles/defaults.yaml", "etc/agentlab/profiles/defaults.yaml"),
    ] {
        assert!(assets.contains(&(needed.to_owned(), dest.to_owned())), "{needed} -> {dest}");
    }
    let conf_files = manifest.split("conf-files = [").nth(1).unwrap().split(']').next().unwrap();
    let conf_files: Vec<&str> =
        conf_files.split(',').map(|c| c.trim().trim_matches('"')).filter(|c| !c.is_empty()).collect();
    assert_eq!(conf_files, ["/etc/default/agentlabd", "/etc/agentlab/profiles/defaults.yaml"]);
    for conf in conf_files {
        assert!(assets.iter().any(|(_, d)| format!("/{d}") == conf), "conffile {conf} is not installed");
    }
    // The default environment file names only variables agentlabd reads.
    let defaults = std::fs::read_to_string(crate_dir.join("../host/default/agentlabd")).unwrap();
    let daemon = std::fs::read_to_string(crate_dir.join("src/bin/agentlabd.rs")).unwrap();
    let vars: Vec<&str> = defaults
        .lines()
        .filter_map(|l| l.strip_prefix("#AGENTLAB_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(vars, ["IMAGE_DIR", "PROFILES_DIR", "LOG"]);
    for var in vars.iter().map(|k| format!("AGENTLAB_{k}")) {
        assert!(daemon.contains(&format!("env = \"{var}\"")), "{var} is not read by agentlabd");
    }
}
