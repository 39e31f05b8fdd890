"""`ray up` / `ray submit` / `ray down` with cluster.local.yaml, over SSH to this machine's loopback.

What README and cluster.yaml promise on AWS, run for real on one machine: the launcher SSHes to
127.0.0.1:2222, rsyncs the working tree, runs the head's setup and `ray start` commands in login
shells, `ray submit` copies sweeps/sweep.py to ~/sweep.py and runs it there (it joins the running
cluster and runs the smoke sweep), and `ray down` stops Ray again.

Needs root and apt (CI: a fresh Debian machine) to install openssh-server and rsync when missing.
It starts its own sshd, bound to 127.0.0.1:2222 only, with an ephemeral host key and a private
authorized-keys file, and stops it by PID afterwards. It changes ~/.ssh/config (the port, which
Ray's `auth` section cannot hold) and ~/.bashrc (the login shell's PATH and Ray switches), creates
the key pair that cluster.local.yaml names, and restores every file it touched in a finally block.

`ray up` and `ray down` run `ray stop`, which ends every Ray process on the machine: run this alone,
e.g. `flock /tmp/qlora-heavy.lock make test-e2e`.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, ray_processes, wait_for_no_ray_processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

HOME = Path.home()
SSH_PORT = 2222
KEY = HOME / ".ssh" / "qlora_sweep_e2e"  # cluster.local.yaml's auth.ssh_private_key
CLUSTER = REPO / "cluster.local.yaml"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
BLOCK_BEGIN, BLOCK_END = "# >>> qlora-sweep e2e >>>", "# <<< qlora-sweep e2e <<<"
# Files that `ray up` / `ray submit` / this test create or change in the home folder.
TOUCHED = [
    HOME / ".ssh" / "config",
    HOME / ".bashrc",
    KEY,
    KEY.with_suffix(".pub"),
    HOME / ".ray" / "auth_token",
    HOME / "ray_bootstrap_config.yaml",
    HOME / "ray_bootstrap_key.pem",
    HOME / "sweep.py",
    HOME / "sweeps",
    HOME / "qlora-sweep-e2e",
    HOME / ".ssh",  # last: removed only if this test created it
]


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"  exit {result.returncode} after {time.time() - started:.0f}s", flush=True)
    return result


def require_root_and_packages() -> None:
    """Install openssh-server and rsync with apt if missing; skip where that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("the e2e test needs root: it installs openssh-server/rsync and starts sshd as root")
    missing = [pkg for pkg, binary in (("openssh-server", "/usr/sbin/sshd"), ("rsync", "rsync"), ("openssh-client", "ssh"))
               if not shutil.which(binary)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"the e2e test needs {', '.join(missing)} and there is no apt-get to install them")
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


@contextmanager
def restored(paths: list[Path]) -> Iterator[None]:
    """Put every path back as it was: saved files rewritten, paths that did not exist removed.

    Folders that already existed are left alone (the test only adds files it lists here).
    """
    saved: dict[Path, tuple[bytes, int] | None] = {}
    for path in paths:
        if path.is_symlink() or not path.exists():
            saved[path] = None if not path.is_symlink() else (os.readlink(path).encode(), -1)
        elif path.is_file():
            saved[path] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    try:
        yield
    finally:
        for path, before in saved.items():
            if before is None:
                if path.is_symlink() or path.is_file():
                    path.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
            elif before[1] == -1:  # a symlink
                if path.is_symlink() or path.is_file():
                    path.unlink()
                path.symlink_to(before[0].decode())
            else:
                path.write_bytes(before[0])
                path.chmod(before[1])


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def loopback_sshd(workdir: Path) -> Iterator[None]:
    """sshd on 127.0.0.1:2222 only, accepting root with KEY; stopped by PID, sessions included."""
    import psutil

    if port_is_open(SSH_PORT):
        pytest.fail(f"127.0.0.1:{SSH_PORT} is already in use; cluster.local.yaml's SSH port must be free for the test")
    host_key = workdir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    authorized = workdir / "authorized_keys"
    authorized.write_text(KEY.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {SSH_PORT}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {workdir / 'sshd.pid'}",
                # A private keys file: ~/.ssh/authorized_keys stays untouched. It lives under /tmp,
                # whose mode StrictModes would reject; this sshd only takes this one key on loopback.
                f"AuthorizedKeysFile {authorized}",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "AllowUsers root",
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
        while not port_is_open(SSH_PORT):
            if sshd.poll() is not None or time.time() > deadline:
                pytest.fail(f"sshd did not start on 127.0.0.1:{SSH_PORT}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        # The listener's forked session processes (Ray keeps an SSH master open for 10 s) go too.
        for child in psutil.Process(sshd.pid).children(recursive=True):
            child.terminate()
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()
            sshd.wait()
        if made_privsep:
            shutil.rmtree(privsep, ignore_errors=True)


def prepend_ssh_config() -> None:
    """The port for 127.0.0.1 (Ray's auth section has no port key), ahead of any existing entries."""
    path = HOME / ".ssh" / "config"
    before = path.read_text() if path.exists() else ""
    block = (
        f"{BLOCK_BEGIN}\nHost 127.0.0.1\n    Port {SSH_PORT}\n    IdentityFile {KEY}\n"
        f"    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n{BLOCK_END}\n\n"
    )
    path.write_text(block + before)
    path.chmod(0o600)


def append_login_shell_env() -> None:
    """What cluster.local.yaml's header asks for in ~/.bashrc, plus the test's model cache.

    Ray runs every remote command as `bash --login -c -i 'source ~/.bashrc; ...'`
    (ray/autoscaler/_private/command_runner.py, _with_interactive), so ~/.bashrc is the file read.
    """
    path = HOME / ".bashrc"
    before = path.read_text() if path.exists() else ""
    lines = [
        BLOCK_BEGIN,
        f'export PATH="{VENV_BIN}:$PATH"',
        "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
        "export RAY_AUTH_MODE=token",
        # Test-only: reuse this session's tiny-model cache and never reach for a hub.
        f"export QLORA_SWEEP_CACHE={os.environ['QLORA_SWEEP_CACHE']}",
        "export HF_HUB_OFFLINE=1",
        BLOCK_END,
    ]
    path.write_text(before + ("\n" if before and not before.endswith("\n") else "") + "\n".join(lines) + "\n")


def test_ray_up_submit_down_runs_the_smoke_sweep_over_loopback_ssh(tmp_path: Path) -> None:
    require_root_and_packages()
    others = ray_processes(any_run=True)
    if others:  # `ray up` starts with `ray stop`, which would kill them
        pytest.fail(f"other Ray processes are running ({len(others)}, e.g. pid {others[0].pid}); run the e2e test alone")
    results = tmp_path / "results"
    name = "e2e-smoke"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    timings: dict[str, float] = {}
    outcomes: dict[str, int] = {}
    started = time.time()
    with ExitStack() as stack:
        stack.enter_context(restored(TOUCHED))
        (HOME / ".ssh").mkdir(mode=0o700, exist_ok=True)
        for path in (KEY, KEY.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qlora-sweep-e2e", "-f", str(KEY)], check=True)
        if (HOME / "sweeps").is_symlink():  # left by an older cluster.local.yaml; find_spec must do without
            (HOME / "sweeps").unlink()
        prepend_ssh_config()
        append_login_shell_env()
        stack.enter_context(loopback_sshd(tmp_path))

        login = run(["ssh", "127.0.0.1", "bash --login -c -i 'source ~/.bashrc; command -v qlora-sweep'"], timeout=60)
        assert login.returncode == 0 and login.stdout.strip().endswith("qlora-sweep"), login.stdout + login.stderr

        def down() -> None:
            result = run([RAY, "down", "-y", str(CLUSTER)], timeout=300, cwd=REPO, env=env)
            outcomes["ray down"] = result.returncode
            if result.returncode:
                print(result.stdout[-3000:], result.stderr[-3000:])

        stack.callback(down)
        t = time.time()
        up = run([RAY, "up", "-y", "--no-config-cache", str(CLUSTER)], timeout=600, cwd=REPO, env=env)
        timings["ray up"] = time.time() - t
        assert up.returncode == 0, up.stdout[-5000:] + up.stderr[-5000:]

        t = time.time()
        submit = run(
            [RAY, "submit", "--no-config-cache", str(CLUSTER), "sweeps/sweep.py", "--",
             "--config", "sweeps/smoke.yaml", "--storage", str(results), "--name", name],
            timeout=900, cwd=REPO, env=env,
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
        stack.pop_all().close()  # ray down, stop sshd, restore files: before the checks below
        timings["ray down + cleanup"] = time.time() - t

    assert outcomes["ray down"] == 0, "ray down failed (its output is printed above)"
    leftover = wait_for_no_ray_processes()
    assert not leftover, f"Ray processes left behind after `ray down`: {leftover}"
    assert not port_is_open(SSH_PORT), "the test's sshd is still listening"
    assert BLOCK_BEGIN not in (HOME / ".bashrc").read_text()
    print("timings:", {k: round(v) for k, v in timings.items()}, "total", round(time.time() - started), "s")
