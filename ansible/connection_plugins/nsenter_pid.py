"""Run Ansible tasks inside the namespaces of a process (a systemd-nspawn container's init).

Our own small connection plugin for the system tests: there is no machined on the test host,
so `machinectl`/`systemd-run -M` cannot reach the container, but `nsenter --all` can.
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Any

from ansible.errors import AnsibleConnectionFailure
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nsenter_pid
short_description: execute tasks in the namespaces of a process with nsenter
description:
  - Runs every command as C(nsenter --target PID --all /bin/sh -c CMD) on the controller;
    files go in and out through C(cat) over stdin/stdout.
author: studio-agent maintainers
options:
  nsenter_pid:
    description: Host PID of a process inside the target (a container's systemd).
    required: true
    type: int
    vars:
      - name: ansible_nsenter_pid
"""

# Commands run with the target's own PATH, not the controller's (pyenv shims, venvs).
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


class Connection(ConnectionBase):
    transport = "nsenter_pid"
    has_pipelining = True

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def _run(self, cmd: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        pid = str(self.get_option("nsenter_pid"))
        argv = ["nsenter", "--target", pid, "--all", "/bin/sh", "-c", cmd]
        return subprocess.run(argv, env=ENV, check=False, **kwargs)

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = self._run(cmd, input=in_data or b"", capture_output=True)
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as source:
            proc = self._run(f"cat > {shlex.quote(out_path)}", stdin=source, capture_output=True)
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace")
            raise AnsibleConnectionFailure(f"put {out_path}: {why}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as target:
            proc = self._run(f"cat {shlex.quote(in_path)}", stdout=target, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace")
            raise AnsibleConnectionFailure(f"fetch {in_path}: {why}")

    def close(self) -> None:
        self._connected = False
