//! `pve-standin`: runs the Proxmox VE stand-in until interrupted and prints how to
//! reach it (URL, certificate fingerprint, token) as one JSON line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use agentlab_pve_standin::{GuestMode, NodeSpec, Options, StandIn};

fn usage() -> ! {
    eprintln!(
        "usage: pve-standin [--pve 8|9] [--nodes N] [--guests none|fake|boot] [--hybrid-dir DIR] [--image-dir DIR] [--fault-rate R] [--task-ms MS]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut options = Options::default();
    let (mut guests, mut hybrid_dir, mut image_dir) = ("none".to_owned(), None, PathBuf::from("build/image"));
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--pve" => options.schema_version = value.parse().unwrap_or_else(|_| usage()),
            "--nodes" => {
                let n: usize = value.parse().unwrap_or_else(|_| usage());
                options.nodes = (1..=n).map(|i| NodeSpec::new(&format!("pve{i}"))).collect();
                options.templates = (1..=n).map(|i| (9000 + i as u32 - 1, format!("pve{i}"))).collect();
            }
            "--guests" => guests = value,
            "--hybrid-dir" => hybrid_dir = Some(PathBuf::from(value)),
            "--image-dir" => image_dir = PathBuf::from(value),
            "--fault-rate" => options.fault_rate = value.parse().unwrap_or_else(|_| usage()),
            "--task-ms" => options.task_duration = Duration::from_millis(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    options.guest = match (guests.as_str(), hybrid_dir) {
        ("none", _) => GuestMode::None,
        ("fake", Some(hybrid_dir)) => GuestMode::Fake { hybrid_dir },
        ("boot", Some(hybrid_dir)) => GuestMode::Boot { hybrid_dir, image_dir },
        _ => usage(),
    };
    let token = format!("{}={}", options.token_id, options.token_secret);
    let standin = StandIn::start(options).await.unwrap_or_else(|e| {
        eprintln!("pve-standin: {e}");
        std::process::exit(1)
    });
    println!("{}", serde_json::json!({"url": standin.url(), "fingerprint": standin.fingerprint, "token": token}));
    let _ = tokio::signal::ctrl_c().await;
}
