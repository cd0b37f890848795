//! The qemu backend's second image layout: a full disk (the systemd template that
//! image/build-template.sh makes for Proxmox), booted with the kernel and initrd that the
//! build extracted from it. The agent there is a systemd service, not PID 1.
//!
//! An image directory holding `disk.qcow2` is a disk image; otherwise it is the micro
//! image (`vmlinux` + `initrd.img`, the agent as `/init`). The disk is attached with
//! `snapshot=on`: every sandbox writes to its own throwaway overlay and the template
//! itself is never modified.

use std::path::{Path, PathBuf};

/// The template disk inside an image directory.
pub const DISK: &str = "disk.qcow2";
/// The root filesystem's label, set by image/build-template.sh.
pub const ROOT_LABEL: &str = "agentlab-root";
/// Where the template installs the agent; a probe boot runs it as init directly.
const AGENT_PATH: &str = "/usr/bin/agentlab-agent";

/// Which layout an image directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// `vmlinux` + `initrd.img` with the agent as PID 1.
    Micro,
    /// `disk.qcow2` with systemd, plus its extracted kernel and initrd.
    Disk,
}

impl ImageKind {
    pub fn of(image_dir: &Path) -> ImageKind {
        if image_dir.join(DISK).exists() { ImageKind::Disk } else { ImageKind::Micro }
    }
}

/// The kernel to boot: the uncompressed `vmlinux` (fast PVH boot under TCG) if the
/// build made one, else the packaged `vmlinuz`.
pub fn kernel(image_dir: &Path, kind: ImageKind) -> PathBuf {
    let vmlinux = image_dir.join("vmlinux");
    if kind == ImageKind::Disk && !vmlinux.exists() { image_dir.join("vmlinuz") } else { vmlinux }
}

/// Files the layout needs, for the missing-image error.
pub fn required_files(image_dir: &Path, kind: ImageKind) -> Vec<PathBuf> {
    let mut files = vec![kernel(image_dir, kind), image_dir.join("initrd.img")];
    if kind == ImageKind::Disk {
        files.push(image_dir.join(DISK));
    }
    files
}

/// Kernel command line for a disk image: the micro image's, plus the root filesystem.
/// A probe boot runs the agent as init, which prints its marker and powers off.
pub fn disk_cmdline(base: &str, probe: bool) -> String {
    let mut cmdline = format!("root=LABEL={ROOT_LABEL} ro rootwait {base}");
    if probe {
        cmdline.push_str(&format!(" init={AGENT_PATH} agentlab.probe"));
    }
    cmdline
}

/// The disk, as a virtio-blk device with a per-VM throwaway overlay.
pub fn drive_args(image_dir: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},if=virtio,format=qcow2,snapshot=on,cache=unsafe", image_dir.join(DISK).display()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_with_a_disk_is_a_disk_image_and_prefers_vmlinux() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ImageKind::of(dir.path()), ImageKind::Micro);
        std::fs::write(dir.path().join(DISK), b"").unwrap();
        assert_eq!(ImageKind::of(dir.path()), ImageKind::Disk);
        assert_eq!(kernel(dir.path(), ImageKind::Disk), dir.path().join("vmlinuz"));
        std::fs::write(dir.path().join("vmlinux"), b"").unwrap();
        assert_eq!(kernel(dir.path(), ImageKind::Disk), dir.path().join("vmlinux"));
        assert_eq!(
            disk_cmdline("quiet", true),
            "root=LABEL=agentlab-root ro rootwait quiet init=/usr/bin/agentlab-agent agentlab.probe"
        );
    }
}
