# The Proxmox builders as a plugin (`packer init packer/` installs it). Kept apart from
# agentlab.pkr.hcl because Debian's packer (1.6.6) predates plugins: it has the Proxmox
# builders built in, and CI checks agentlab.pkr.hcl with it (see packer/README.md).
packer {
  required_plugins {
    proxmox = {
      version = ">= 1.1.8"
      source  = "github.com/hashicorp/proxmox"
    }
  }
}
