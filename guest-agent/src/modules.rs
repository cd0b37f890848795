//! Kernel module loading for the micro image, whose virtio and vsock drivers are
//! modules in Debian's kernel. There is no modprobe: the image lists them in
//! dependency order.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// The image's module list: one file name per line, relative to [`MODULE_DIR`].
pub const MODULE_ORDER: &str = "/etc/agentlab/modules.order";
pub const MODULE_DIR: &str = "/lib/modules";

/// Loads every listed module, in order. A module that is already loaded is fine.
pub fn load_listed(order_file: &Path, dir: &Path) -> Result<usize, String> {
    let list = match std::fs::read_to_string(order_file) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("reading {}: {e}", order_file.display())),
    };
    let mut loaded = 0;
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let path = dir.join(name);
        let file = File::open(&path).map_err(|e| format!("opening module {}: {e}", path.display()))?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading module {}: {e}", path.display())),
        }
    }
    Ok(loaded)
}
