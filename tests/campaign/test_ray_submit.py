"""``ray up`` / ``ray submit`` / ``ray down`` with cluster.local.yaml, as the README gives them,
against an SSH server on 127.0.0.1: the path a user takes to run a campaign on machines they
already have. Only the values the config asks a user to edit are changed (the machine, the
login, the cluster's name, ports and temp dir, so that it never meets another Ray here).

The SSH server is Debian's openssh-server (``.ci/run`` installs it, with rsync, under CI); it
runs as root on a free port, reached through a ProxyCommand (Ray's SSH has no port setting),
and gives the session a HOME of its own, whose ~/.bashrc puts this interpreter first on PATH,
as cluster.local.yaml tells a user to.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bitstorm import ray_node
from campaign.analysis.results import open_results
from tests.campaign.runs import planned, tiny_settings, tiny_spec, trial_rows

ROOT = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")
BIN = Path(sys.executable).parent  # this interpreter's ray and python
SMALL = {"formats": ["fp32"]}  # the tiny campaign, smaller still: Ray's start is what is tested


# ssh's ProxyCommand: its stdin and stdout to a TCP port, in one process that ends with either.
PROXY = """#!{python}
import os, socket, threading
server = socket.create_connection(("127.0.0.1", {port}))
def send():
    while data := os.read(0, 65536):
        server.sendall(data)
    server.shutdown(socket.SHUT_WR)
threading.Thread(target=send, daemon=True).start()
while data := server.recv(65536):
    os.write(1, data)
"""


@dataclass(frozen=True)
class Login:
    """An SSH login as root on 127.0.0.1 that Ray's local provider can use."""

    key: Path
    proxy: Path  # the ProxyCommand that reaches the server's port
    home: Path  # the session's HOME


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _missing() -> str | None:
    """Why this machine cannot run the SSH server, or None."""
    if os.geteuid() != 0:
        return "sshd logs in as root only when run by root"
    if not SSHD.exists():
        return f"{SSHD} missing (apt-get install openssh-server; .ci/run does under CI)"
    for tool in ("ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install openssh-client rsync; .ci/run does under CI)"
    return None


@pytest.fixture
def sshd(tmp_path):
    """sshd on a free port of 127.0.0.1, for a throwaway key; stopped after the test."""
    if reason := _missing():
        pytest.skip(reason)
    folder = tmp_path / "ssh"
    home = folder / "home"
    home.mkdir(parents=True)
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", folder / name], check=True
        )
    port = free_port()
    proxy = folder / "proxy"
    proxy.write_text(PROXY.format(python=sys.executable, port=port))
    proxy.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder, as its service makes
    options = {
        "ListenAddress": "127.0.0.1",
        "HostKey": folder / "host",
        "AuthorizedKeysFile": folder / "client.pub",
        "PermitRootLogin": "prohibit-password",
        "PasswordAuthentication": "no",
        "StrictModes": "no",  # the key lies under /tmp, which everyone may write
        "PidFile": "none",
        "SetEnv": f"HOME={home}",
    }
    args = [str(SSHD), "-D", "-e", "-f", "/dev/null", "-p", str(port)]
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    log = folder / "sshd.log"
    with log.open("w") as sink:
        server = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 10
        while "Server listening" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not start: {log.read_text().strip()[-300:]}")
            time.sleep(0.1)
        yield Login(folder / "client", proxy, home)
    finally:
        server.terminate()
        server.wait(10)


def ssh(login: Login, command: str) -> str:
    """``command``'s stdout, run in a login shell on the server as Ray runs its commands."""
    options = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    options += ["-o", "IdentitiesOnly=yes", "-o", f"ProxyCommand={login.proxy}"]
    done = subprocess.run(
        ["ssh", "-i", str(login.key), *options, "root@127.0.0.1", command],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def head_shell(login: Login, temp_dir: Path) -> Path:
    """The head's ~/.bashrc: this interpreter first on PATH, this checkout importable; and a
    ``ray`` that runs ``ray stop`` (which ``ray down`` sends, and which stops every Ray on the
    machine: other users', this test suite's own) as bitstorm.ray_node's stop of this node."""
    wrappers = login.home / "bin"
    wrappers.mkdir()
    ray = wrappers / "ray"
    ray.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = stop ] && exec {sys.executable} -m bitstorm.ray_node stop {temp_dir}\n'
        f'exec {BIN / "ray"} "$@"\n'
    )
    ray.chmod(0o755)
    (login.home / ".bashrc").write_text(
        f'export PATH="{wrappers}:{BIN}:$PATH" PYTHONPATH="{ROOT}"\n'
    )
    return ray


def local_config(login: Login, temp_dir: Path, folder: Path) -> tuple[Path, int]:
    """cluster.local.yaml for this machine: its file and the head's Ray port."""
    text = (ROOT / "cluster.local.yaml").read_text().replace("/tmp/bitstorm-ray", str(temp_dir))
    # Every port the nodes bind becomes a free one, the same wherever it recurs (ADDRESS:PORT).
    ports = {number: free_port() for number in re.findall(r"port=(\d+)", text)}
    text = re.sub(r"(?<=[=:])\d+\b", lambda m: str(ports.get(m.group(0), m.group(0))), text)
    config = yaml.safe_load(text)
    config["cluster_name"] = temp_dir.name  # Ray keeps a cluster's state in /tmp/ray by name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {
        "ssh_user": "root",
        "ssh_private_key": str(login.key),
        "ssh_proxy_command": str(login.proxy),
    }
    path = folder / "cluster.local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ports["6390"]


def ray_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "ray"), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check and done.returncode:
        pytest.fail(f"ray {args[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def test_ray_up_submit_down_runs_a_campaign_on_a_local_provider_cluster(
    sshd, checkpoints, tmp_path
):
    temp_dir = Path(tempfile.mkdtemp(prefix="bs-ray-", dir="/tmp"))  # short: Ray's socket paths
    wrapper = head_shell(sshd, temp_dir)
    # Ray's commands must reach this HOME's ~/.bashrc, or `ray down` would stop every Ray here.
    assert ssh(sshd, "source ~/.bashrc; command -v ray") == str(wrapper)
    config, port = local_config(sshd, temp_dir, tmp_path)
    spec = tmp_path / "spec.yaml"
    output = tmp_path / "results"
    spec.write_text(yaml.safe_dump(tiny_settings(checkpoints, output, **SMALL)))
    # Another Ray on this machine, as `ray stop` recognises one: by a process named raylet.
    decoy = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), decoy)
    other = subprocess.Popen([str(decoy), "600"])
    try:
        ray_cli("up", "-y", "--no-config-cache", config)
        assert ray_node.node_processes(temp_dir), "ray up started no Ray node in its temp dir"
        done = ray_cli(
            "submit", "--no-config-cache", config, ROOT / "campaign" / "run.py", "--",
            "--address", f"127.0.0.1:{port}", "--spec", spec,
        )  # fmt: skip
    finally:
        down = ray_cli("down", "-y", config, check=False)
        left = ray_node.stop(temp_dir)  # whatever down did not stop, so that nothing lingers
        shutil.rmtree(temp_dir, ignore_errors=True)
        for state in Path("/tmp/ray").glob(f"cluster-{temp_dir.name}.*"):  # the provider's record
            state.unlink()
        alive = other.poll() is None
        other.kill()
    assert f"joining the Ray cluster at 127.0.0.1:{port}" in done.stdout + done.stderr
    assert "SDC" in done.stdout  # the console summary, printed by the driver on the head
    assert down.returncode == 0 and left == 0, f"ray down left {left} processes:\n{down.stdout}"
    assert alive, "the cluster's start or stop commands killed another Ray's process"
    results = open_results(str(output / "test"))
    assert results.manifest["status"] == "complete"
    plan, images, _ = planned(tiny_spec(checkpoints, output, **SMALL))
    rows = trial_rows(output)
    assert rows.groupby("shard").size().to_dict() == {
        s.id: s.size(len(images.indices)) for s in plan
    }
