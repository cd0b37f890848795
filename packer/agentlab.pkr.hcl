# AgentLab template for Proxmox VE: clones a base template (any Debian/Ubuntu cloud image
# with cloud-init and qemu-guest-agent), uploads the static agentlab-agent and its systemd
# unit, installs them, and turns the result into a new template.
#
#   packer init packer/ && packer build -var-file=node.pkrvars.hcl packer/
#
# See packer/README.md for the variables, the Proxmox token's permissions, and why the
# vsock device is added per clone by agentlabd rather than here.

variable "proxmox_url" {
  type        = string
  description = "The node's API endpoint, e.g. https://pve1.example:8006/api2/json"
}

variable "proxmox_node" {
  type        = string
  description = "The node that clones and builds, e.g. pve1"
}

variable "proxmox_token_id" {
  type        = string
  description = "API token id, user@realm!name, e.g. packer@pve!agentlab"
}

variable "proxmox_token_secret" {
  type        = string
  sensitive   = true
  description = "The API token's secret (never commit it: pass PKR_VAR_proxmox_token_secret)"
}

variable "insecure_skip_tls_verify" {
  type        = bool
  default     = false
  description = "Accept the node's self-signed certificate (only on a trusted network)"
}

variable "base_template" {
  type        = string
  description = "Name of the base template to clone (cloud-init and qemu-guest-agent installed)"
}

variable "template_name" {
  type    = string
  default = "agentlab-debian12"
}

variable "storage_pool" {
  type        = string
  default     = "local-lvm"
  description = "Storage for the clone's disk and its cloud-init drive"
}

variable "bridge" {
  type        = string
  default     = "vmbr0"
  description = "Bridge for the build VM. It must be reachable from where packer runs (SSH); the sandbox bridge (vmbr1) refuses inbound connections by design"
}

variable "ssh_username" {
  type        = string
  default     = "debian"
  description = "The base template's cloud-init user"
}

variable "ssh_private_key_file" {
  type        = string
  description = "Private key whose public half the base template's cloud-init user accepts"
}

variable "agent_binary" {
  type        = string
  default     = "target/x86_64-unknown-linux-musl/release/agentlab-agent"
  description = "The static agent, as `make agent` builds it (relative to the repository root)"
}

source "proxmox-clone" "agentlab" {
  proxmox_url              = var.proxmox_url
  username                 = var.proxmox_token_id
  token                    = var.proxmox_token_secret
  insecure_skip_tls_verify = var.insecure_skip_tls_verify
  node                     = var.proxmox_node

  clone_vm             = var.base_template
  full_clone           = true
  template_name        = var.template_name
  template_description = "AgentLab template: agentlab-agent starts from systemd and dials the host over vsock"

  cores           = 2
  memory          = 2048
  os              = "l26"
  scsi_controller = "virtio-scsi-single"
  # packer finds the VM's address through the guest agent; agentlabd uses it for status.
  qemu_agent = true

  cloud_init              = true
  cloud_init_storage_pool = var.storage_pool

  network_adapters {
    model  = "virtio"
    bridge = var.bridge
  }

  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "15m"
}

build {
  sources = ["source.proxmox-clone.agentlab"]

  provisioner "file" {
    source      = "${path.root}/../${var.agent_binary}"
    destination = "/tmp/agentlab-agent"
  }

  provisioner "file" {
    source      = "${path.root}/../image/template/agentlab-agent.service"
    destination = "/tmp/agentlab-agent.service"
  }

  provisioner "file" {
    source      = "${path.root}/../image/template/modules-load-agentlab.conf"
    destination = "/tmp/agentlab-modules.conf"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script          = "${path.root}/install-agent.sh"
  }
}
