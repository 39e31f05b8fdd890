"""`ray up` / `ray submit` / `ray down` with cluster.local.yaml, over SSH to this machine's loopback.

What README and cluster.yaml promise on AWS, run for real on one machine: the launcher SSHes to
127.0.0.1, rsyncs the working tree, runs the head's setup and `ray start` commands in login shells,
`ray submit` copies sweeps/sweep.py to ~/sweep.py and runs it there (it joins the running cluster and
runs the smoke sweep), and `ray down` stops Ray again.

It leaves the machine as it found it, and runs beside other Ray clusters:
- The launcher runs as a throwaway unprivileged user created for the test, with a home folder of its
  own under /tmp: every dotfile Ray and ssh need (~/.ssh/config with the port, the key pair,
  ~/.bashrc with the project's PATH) is written there, and nothing in the invoking user's home is
  touched. The user and its home are removed afterwards.
- `ray up` and `ray down` run `ray stop`, which ends every Ray process it can reach; as that user it
  reaches only the user's own processes. Ray's temp folder (RAY_TMPDIR) and every port Ray listens on
  are the user's own, so a Ray cluster already running on the machine (the test starts one, as root,
  and checks it survives) is neither stopped nor confused with this one.
- Its own sshd, on a free 127.0.0.1 port with an ephemeral host key, admitting that user only, stopped
  by PID afterwards.

Needs root (to create the user and start sshd) and apt when openssh-server/rsync are missing (CI: a
fresh Debian machine); the checkout and its .venv must be readable by other users. Without those it
skips, saying why (outside CI) or fails (CI=true, where the machine is meant to allow it).
"""

from __future__ import annotations

import csv
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, end_processes, free_port, ray_processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

CLUSTER = REPO / "cluster.local.yaml"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
KEY_NAME = "qlora_sweep_e2e"  # cluster.local.yaml's auth.ssh_private_key: ~/.ssh/qlora_sweep_e2e
# Ports cluster.local.yaml's `ray start` reads from the login shell (defaults: Ray's own).
PORT_VARIABLES = ("QLORA_SWEEP_E2E_GCS_PORT", "QLORA_SWEEP_E2E_DASHBOARD_PORT",
                  "QLORA_SWEEP_E2E_CLIENT_PORT", "QLORA_SWEEP_E2E_AGENT_PORT")


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"  exit {result.returncode} after {time.time() - started:.0f}s", flush=True)
    return result


def cannot_run(reason: str) -> None:
    """Fail in CI, where the machine is meant to allow this test; skip elsewhere, saying why."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def require_root_and_packages() -> None:
    """Install openssh-server and rsync with apt if missing; skip where that cannot be done."""
    if os.geteuid() != 0:
        cannot_run("the e2e test needs root: it creates a throwaway user and starts sshd (and installs openssh-server/rsync when missing)")
    missing = [pkg for pkg, binary in (("openssh-server", "/usr/sbin/sshd"), ("rsync", "rsync"), ("openssh-client", "ssh"))
               if not shutil.which(binary)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        cannot_run(f"the e2e test needs {', '.join(missing)} and there is no apt-get to install them")
    # Refuse service starts while installing: a freshly installed openssh-server would otherwise
    # start the system sshd on 0.0.0.0:22; this test wants its own on loopback only.
    policy = Path("/usr/sbin/policy-rc.d")
    had_policy = policy.exists()
    try:
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        update = run(["apt-get", "update", "-qq"], timeout=600, env=env)
        install = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=900, env=env)
    finally:
        if not had_policy:
            policy.unlink(missing_ok=True)
    assert install.returncode == 0, f"apt-get install {' '.join(missing)} failed:\n{update.stderr}\n{install.stderr}"





def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_of(uid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real == uid:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def ray_processes_of(uid: int) -> list[psutil.Process]:
    mine = {p.pid for p in processes_of(uid)}
    return [p for p in ray_processes(any_run=True) if p.pid in mine]


def carrying(marker: str) -> list[psutil.Process]:
    """Processes whose environment, or an ancestor's, holds QLORA_SWEEP_E2E_OTHER=marker.

    Ray's agents rename themselves (setproctitle reuses the memory /proc shows as their environment),
    so for them the marker is read from the raylet that started them.
    """
    found = []
    for proc in psutil.process_iter():
        try:
            for each in [proc, *proc.parents()]:
                try:
                    if each.environ().get("QLORA_SWEEP_E2E_OTHER") == marker:
                        found.append(proc)
                        break
                except (psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        except psutil.NoSuchProcess:
            continue
    return found


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path
    bin: Path = VENV_BIN  # where its `python`, `ray` and `qlora-sweep` are

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` as this user, with a clean environment (nothing of the invoking user's leaks in)."""
        env = {
            "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "SHELL": "/bin/bash",
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "TMPDIR": str(self.home / "t"), "RAY_TMPDIR": str(self.home / "t"),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        }
        return ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd]

    def write(self, relative: str, text: str, mode: int = 0o644) -> Path:
        path = self.home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path


@contextmanager
def throwaway_user() -> Iterator[User]:
    """A new unprivileged user with a home under /tmp; it, its files and its processes go afterwards."""
    for tool in ("useradd", "userdel", "usermod", "runuser"):
        if not shutil.which(tool):
            cannot_run(f"the e2e test needs `{tool}` to create its throwaway user")
    name = f"qse2e{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="qe-", dir="/tmp"))  # short: Ray's socket paths live below it
    base.chmod(0o755)
    home = base / "h"
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash", "--user-group", name],
                   check=True, capture_output=True)
    try:
        # Without PAM, sshd refuses a locked account ("!" in /etc/shadow, useradd's default) even for keys.
        subprocess.run(["usermod", "--password", "*", name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid, home)
    finally:
        end_processes(processes_of(pwd.getpwnam(name).pw_uid) if _user_exists(name) else [])  # all started by this test
        uid = pwd.getpwnam(name).pw_uid if _user_exists(name) else None
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        # Ray's SSH control sockets: /tmp/ray_ssh_<sha256(user)[:10]>/ (autoscaler command_runner.py)
        shutil.rmtree(f"/tmp/ray_ssh_{hashlib.sha256(name.encode()).hexdigest()[:10]}", ignore_errors=True)
        assert uid is None or not processes_of(uid)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@contextmanager
def loopback_sshd(workdir: Path, user: User, port: int) -> Iterator[None]:
    """sshd on 127.0.0.1:port only, admitting `user` with its key; stopped by PID, sessions included."""
    host_key = workdir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {workdir / 'sshd.pid'}",
                "AuthorizedKeysFile .ssh/authorized_keys",
                "PermitRootLogin no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                f"AllowUsers {user.name}",
                "MaxStartups 50",  # Ray opens several connections at once
                "MaxSessions 50",
                "",
            ]
        )
    )
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation folder
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    log = workdir / "sshd.log"
    with log.open("w") as log_file:  # a file, not a pipe: a full pipe would block sshd
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=log_file)
    try:
        deadline = time.time() + 20
        while not port_is_open(port):
            if sshd.poll() is not None or time.time() > deadline:
                pytest.fail(f"sshd did not start on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        # The listener's forked session processes (Ray keeps an SSH master open for 10 s) go too.
        end_processes([*psutil.Process(sshd.pid).children(recursive=True), psutil.Process(sshd.pid)])
        if made_privsep:
            shutil.rmtree(privsep, ignore_errors=True)


@contextmanager
def another_ray_cluster(workdir: Path) -> Iterator[list[psutil.Process]]:
    """A Ray head started as the invoking user, as a contributor's own Ray job would be."""
    marker = secrets.token_hex(8)
    env = {**os.environ, "QLORA_SWEEP_E2E_OTHER": marker, "RAY_TMPDIR": str(workdir),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    start = run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                 "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=1", "--num-gpus=0",
                 "--object-store-memory=100000000", "--disable-usage-stats"], timeout=180, env=env)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    try:
        processes = carrying(marker)
        core = [p for p in processes if p.name() in ("gcs_server", "raylet")]
        assert len(core) == 2, [p.name() for p in processes]
        yield core
    finally:
        end_processes(carrying(marker))  # only what this test started; never `ray stop`


def home_snapshot() -> dict[str, object]:
    """What the invoking user's home holds at its top level and in the dotfiles Ray and ssh use."""
    home = Path.home()
    snapshot: dict[str, object] = {"entries": sorted(p.name for p in home.iterdir())}
    for relative in (".bashrc", ".profile", ".ssh", ".ray"):
        path = home / relative
        if path.is_dir():
            snapshot[relative] = sorted(
                (str(f.relative_to(path)), hashlib.sha256(f.read_bytes()).hexdigest()) for f in path.rglob("*") if f.is_file()
            )
        elif path.is_file():
            snapshot[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


def reachable_bin(user: User, workdir: Path) -> Path:
    """A bin folder with this test run's packages that `user` can run.

    This venv's own when the user can start its interpreter. A venv's interpreter may live where
    other users cannot go (pyenv under /root, as on this project's CI machines); then an overlay
    venv on the system's interpreter of the same version, whose site-packages are this venv's (one
    .pth line) and whose scripts are this venv's entry points with the shebang pointed at it.
    """
    if run(user.command([str(VENV_BIN / "python"), "-c", "import ray, sweeps"]), timeout=120).returncode == 0:
        return VENV_BIN
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        cannot_run(f"an unprivileged user cannot run {sys.executable} and there is no system {version} to stand in")
    overlay = workdir / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(overlay)], check=True)
    packages = Path(sysconfig.get_paths()["purelib"])
    (overlay / "lib" / version / "site-packages" / "qlora_sweep_e2e.pth").write_text(
        f"import site; site.addsitedir({str(packages)!r})\n"
    )
    shebang = f"#!{VENV_BIN}/"
    for script in VENV_BIN.iterdir():
        target = overlay / "bin" / script.name
        if script.is_symlink() or not script.is_file() or target.exists():
            continue
        head = script.read_bytes()[:200]
        if head.startswith(shebang.encode()):
            text = script.read_text()
            target.write_text(f"#!{overlay / 'bin'}/" + text[len(shebang):])
            target.chmod(0o755)
    probe = run(user.command([str(overlay / "bin" / "python"), "-c", "import ray, sweeps"]), timeout=120)
    if probe.returncode:
        cannot_run(f"an unprivileged user cannot import this run's packages ({packages}): {probe.stderr[-500:]}")
    return overlay / "bin"


def copy_checkout(user: User) -> Path:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files), as the user's own.

    `ray up` reads every file under its file_mounts to hash them; the invoking user's checkout can
    hold files only they may read (the suite's .hypothesis database, for one).
    """
    target = user.home / "checkout"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
    return target


def prepare_home(user: User, ssh_port: int, ports: dict[str, int]) -> None:
    """The files cluster.local.yaml's header asks for, in the throwaway user's home."""
    key = user.home / ".ssh" / KEY_NAME
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qlora-sweep-e2e", "-f", str(key)], check=True)
    user.write(".ssh/authorized_keys", key.with_suffix(".pub").read_text(), 0o600)
    user.write(
        ".ssh/config",
        f"Host 127.0.0.1\n    Port {ssh_port}\n    IdentityFile {key}\n    StrictHostKeyChecking no\n"
        "    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n",
        0o600,
    )
    # Ray runs every remote command as `bash --login -c -i 'source ~/.bashrc; ...'`
    # (ray/autoscaler/_private/command_runner.py, _with_interactive), so ~/.bashrc is the file read.
    bashrc = user.home / ".bashrc"
    before = bashrc.read_text() if bashrc.exists() else ""
    lines = [
        f'export PATH="{user.bin}:$PATH"',
        "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0",
        f"export RAY_TMPDIR={user.home / 't'} TMPDIR={user.home / 't'}",
        *(f"export {name}={port}" for name, port in ports.items()),
        # Test-only: a model cache of the user's own, and never reach for a hub.
        f"export QLORA_SWEEP_CACHE={user.home / 'cache'} HF_HOME={user.home / 'hf'} HF_HUB_OFFLINE=1",
    ]
    user.write(".bashrc", before + "\n".join(lines) + "\n")
    (user.home / "t").mkdir(exist_ok=True)
    # The launcher logs in as this user: the committed cluster file with only auth.ssh_user changed.
    cluster = yaml.safe_load(CLUSTER.read_text())
    cluster["auth"]["ssh_user"] = user.name
    user.write("cluster.yaml", yaml.safe_dump(cluster, sort_keys=False))
    copy_checkout(user)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user.home)], check=True)


def test_ray_up_submit_down_runs_the_smoke_sweep_over_loopback_ssh(tmp_path: Path) -> None:
    require_root_and_packages()
    home_before = home_snapshot()
    name = "e2e-smoke"
    timings: dict[str, float] = {}
    outcomes: dict[str, int] = {}
    started = time.time()
    with ExitStack() as stack:
        user = stack.enter_context(throwaway_user())
        if run(user.command(["test", "-r", str(CLUSTER)]), timeout=30).returncode:
            cannot_run(f"an unprivileged user cannot read {REPO}: the e2e test runs the launcher as one")
        user.bin = reachable_bin(user, user.home.parent)
        ray = str(user.bin / "ray")
        other = stack.enter_context(another_ray_cluster(Path(tempfile.mkdtemp(prefix="qo-", dir="/tmp"))))
        ssh_port = free_port()
        ports = {variable: free_port() for variable in PORT_VARIABLES}
        prepare_home(user, ssh_port, ports)
        stack.enter_context(loopback_sshd(tmp_path, user, ssh_port))
        cluster = str(user.home / "cluster.yaml")
        checkout = user.home / "checkout"

        login = run(user.command(["ssh", "127.0.0.1", "bash --login -c -i 'source ~/.bashrc; command -v qlora-sweep'"]), timeout=60)
        assert login.returncode == 0 and login.stdout.strip().endswith("qlora-sweep"), login.stdout + login.stderr

        def down() -> None:
            if "ray down" in outcomes:
                return
            result = run(user.command([ray, "down", "-y", cluster]), timeout=300, cwd=checkout)
            outcomes["ray down"] = result.returncode
            if result.returncode:
                print(result.stdout[-3000:], result.stderr[-3000:])

        stack.callback(down)
        t = time.time()
        up = run(user.command([ray, "up", "-y", "--no-config-cache", cluster]), timeout=600, cwd=checkout)
        timings["ray up"] = time.time() - t
        assert up.returncode == 0, up.stdout[-5000:] + up.stderr[-5000:]
        assert port_is_open(ports["QLORA_SWEEP_E2E_GCS_PORT"]), "the head's GCS is not on the port the test gave it"

        t = time.time()
        results = user.home / "results"
        submit = run(
            user.command([ray, "submit", "--no-config-cache", cluster, "sweeps/sweep.py", "--",
                          "--config", "sweeps/smoke.yaml", "--storage", str(results), "--name", name]),
            timeout=900, cwd=checkout,
        )
        timings["ray submit"] = time.time() - t
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-6000:]
        assert "joined the Ray cluster" in output, output[-6000:]  # the running cluster, not a new local one

        report = results / name / "report" / "trials.csv"
        assert report.exists(), output[-6000:]
        with report.open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 12  # sweeps/smoke.yaml: num_samples 12
        assert {row["status"] for row in rows} <= {"completed", "early_stopped"}, [r["status"] for r in rows]
        assert any(row["status"] == "completed" for row in rows)
        assert len({row["node_id"] for row in rows}) == 1  # the one head node of cluster.local.yaml

        t = time.time()
        down()
        timings["ray down"] = time.time() - t
        deadline = time.time() + 30
        while (left := ray_processes_of(user.uid)) and time.time() < deadline:
            time.sleep(0.5)
        stopped_other = [p.name() for p in other if not p.is_running()]
        stack.pop_all().close()  # stop sshd, end the other cluster, remove the user

    assert outcomes["ray down"] == 0, "ray down failed (its output is printed above)"
    assert not left, f"Ray processes of the cluster left behind after `ray down`: {[p.pid for p in left]}"
    assert not stopped_other, f"`ray up`/`ray down` stopped the other Ray cluster's {stopped_other}"
    assert home_snapshot() == home_before, "the test changed the invoking user's home"
    print("timings:", {k: round(v) for k, v in timings.items()}, "total", round(time.time() - started), "s")
