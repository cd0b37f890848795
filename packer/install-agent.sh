#!/bin/sh
# Run by packer's shell provisioner, as root, inside the build VM: installs what the file
# provisioners uploaded to /tmp, exactly as image/build-template.sh lays it out.
set -eu

install -m 0755 /tmp/agentlab-agent /usr/bin/agentlab-agent
install -m 0644 /tmp/agentlab-agent.service /etc/systemd/system/agentlab-agent.service
install -m 0644 /tmp/agentlab-modules.conf /etc/modules-load.d/agentlab.conf
rm -f /tmp/agentlab-agent /tmp/agentlab-agent.service /tmp/agentlab-modules.conf

# The unprivileged user jobs run as, and their workspace. No password, no sudo.
getent passwd agent >/dev/null || useradd --user-group --create-home --shell /bin/bash agent
install -d -m 0755 -o agent -g agent /workspace

systemctl daemon-reload
systemctl enable agentlab-agent.service
/usr/bin/agentlab-agent --version

# Every clone gets its own identity: machine-id at first boot, cloud-init state anew.
if command -v cloud-init >/dev/null; then cloud-init clean --logs; fi
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
