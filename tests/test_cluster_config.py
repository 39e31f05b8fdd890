"""The shipped Ray cluster configs: valid for Ray's own launcher, and safe by default.

Offline and fast: nothing here starts Ray, opens SSH or talks to AWS.

Ray's `prepare_config` only reads the provider's bundled defaults.yaml and merges it in (for the
`local` provider it first builds the single node type from head_ip/worker_ips). Everything that
reaches AWS (key pair, subnets, security groups, IAM, resource auto-detection) happens later, in
`_bootstrap_config` at `ray up`, which these tests never call. The `no_network` fixture makes that
claim checkable: any socket connection or DNS lookup during validation fails the test.

The lint runs on the *prepared* config, i.e. what the launcher will really execute: a key left out
of a cluster file is filled from Ray's defaults, and the AWS defaults start the dashboard on 0.0.0.0
without token auth.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(ROOT.glob("cluster*.yaml"))
AWS_FILE = ROOT / "cluster.yaml"
LOCAL_FILE = ROOT / "cluster.local.yaml"

# Ports that must never face the internet: GCS, dashboard, Ray Client server.
RAY_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray Client"}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
USAGE_COMMANDS = ("ray up", "ray submit", "ray down")


# --- the lint ------------------------------------------------------------------------------------


def iter_commands(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (key path, command) for every shell command in a cluster config."""
    for key, value in config.items():
        if key.endswith("_commands") and isinstance(value, list):
            for i, cmd in enumerate(value):
                yield f"{key}[{i}]", str(cmd)
    for name, node_type in (config.get("available_node_types") or {}).items():
        for key, value in node_type.items():
            if key.endswith("_commands") and isinstance(value, list):
                for i, cmd in enumerate(value):
                    yield f"available_node_types.{name}.{key}[{i}]", str(cmd)


def _ray_start_position(cmd: str) -> int | None:
    match = re.search(r"\bray\s+start\b", cmd)
    return match.start() if match else None


def _dashboard_hosts(cmd: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"--dashboard-host(?:=|\s+)(['\"]?)([^\s'\";]+)\1", cmd)]


def check_usage_header(config: dict[str, Any], text: str) -> list[str]:
    """The file opens with a comment block naming the commands that use it."""
    header = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        header.append(line)
    header_text = "\n".join(header)
    missing = [cmd for cmd in USAGE_COMMANDS if cmd not in header_text]
    if missing:
        return [f"header: the opening comment block does not show {', '.join(repr(m) for m in missing)}; "
                "open the file with the commands that use it"]
    return []


def check_token_auth(config: dict[str, Any], text: str) -> list[str]:
    """Every `ray start` runs with RAY_AUTH_MODE=token set in the same command."""
    problems = []
    for where, cmd in iter_commands(config):
        start = _ray_start_position(cmd)
        if start is None:
            continue
        modes = re.findall(r"\bRAY_AUTH_MODE=(['\"]?)(\w+)\1", cmd[:start])
        mode = modes[-1][1] if modes else None
        if mode != "token":
            shown = f"RAY_AUTH_MODE={mode}" if mode else "no RAY_AUTH_MODE"
            problems.append(f"{where}: {cmd!r} runs `ray start` with {shown}; "
                            "prefix it with `export RAY_AUTH_MODE=token;` in the same command")
    return problems


def check_head_dashboard_loopback(config: dict[str, Any], text: str) -> list[str]:
    """`ray start --head` binds the dashboard to loopback explicitly, or runs no dashboard."""
    problems = []
    for where, cmd in iter_commands(config):
        if _ray_start_position(cmd) is None or not re.search(r"--head\b", cmd):
            continue
        if re.search(r"--include-dashboard(?:=|\s+)['\"]?(?:false|False|0)\b", cmd):
            continue
        hosts = _dashboard_hosts(cmd)
        if not hosts or hosts[-1] not in LOOPBACK_HOSTS:
            shown = f"--dashboard-host={hosts[-1]}" if hosts else "no --dashboard-host"
            problems.append(f"{where}: {cmd!r} starts the head with {shown}; "
                            "add --dashboard-host=127.0.0.1 and reach it with `ray dashboard`")
    return problems


def check_no_public_dashboard(config: dict[str, Any], text: str) -> list[str]:
    """No command anywhere binds a dashboard to a non-loopback address (0.0.0.0, ::, an IP)."""
    problems = []
    for where, cmd in iter_commands(config):
        for host in _dashboard_hosts(cmd):
            if host not in LOOPBACK_HOSTS:
                problems.append(f"{where}: --dashboard-host={host} exposes the dashboard beyond loopback; "
                                "use --dashboard-host=127.0.0.1")
    return problems


def _ingress_rules(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    rules = ((config.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    for i, rule in enumerate(rules):
        yield f"provider.security_group.IpPermissions[{i}]", rule


def _port_range(rule: dict[str, Any]) -> tuple[int, int] | None:
    """Ports a rule opens, or None when it opens no TCP port."""
    protocol = str(rule.get("IpProtocol", "-1")).lower()
    if protocol in ("-1", "all"):
        return (0, 65535)
    if protocol not in ("tcp", "6"):
        return None
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if low in (-1, None) or high in (-1, None):
        return (0, 65535)
    return (int(low), int(high))


def _world_sources(rule: dict[str, Any]) -> list[str]:
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges") or []]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges") or []]
    return [c for c in cidrs if c and ipaddress.ip_network(c, strict=False).prefixlen == 0]


def check_ray_ports_not_public(config: dict[str, Any], text: str) -> list[str]:
    """No ingress rule opens 6379, 8265 or 10001 (alone or inside a range) to 0.0.0.0/0 or ::/0."""
    problems = []
    for where, rule in _ingress_rules(config):
        ports, world = _port_range(rule), _world_sources(rule)
        if ports is None or not world:
            continue
        hit = [f"{name} ({port})" for port, name in RAY_PORTS.items() if ports[0] <= port <= ports[1]]
        if hit:
            problems.append(f"{where}: ports {ports[0]}-{ports[1]} from {', '.join(world)} open "
                            f"{', '.join(hit)} to the internet; remove the rule and use `ray dashboard` / "
                            "`ray attach` over SSH")
    return problems


def check_ssh_not_world(config: dict[str, Any], text: str) -> list[str]:
    """SSH (22) is open only to a narrow CIDR, never to 0.0.0.0/0 or ::/0."""
    problems = []
    for where, rule in _ingress_rules(config):
        ports, world = _port_range(rule), _world_sources(rule)
        if ports is not None and world and ports[0] <= 22 <= ports[1]:
            problems.append(f"{where}: SSH (22) from {', '.join(world)}; narrow it to your office or VPN "
                            "address, e.g. 203.0.113.7/32")
    return problems


def check_aws_security_group_pinned(config: dict[str, Any], text: str) -> list[str]:
    """On AWS every node type brings its own security group.

    A node type without one gets Ray's auto-created group, and Ray always adds SSH from 0.0.0.0/0
    to it (`_create_default_ssh_inbound_rules` in ray/autoscaler/_private/aws/config.py), whatever
    provider.security_group says.
    """
    if (config.get("provider") or {}).get("type") != "aws":
        return []
    problems = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        node_config = node_type.get("node_config") or {}
        if not any(key in node_config for key in ("SecurityGroupIds", "NetworkInterfaces", "LaunchTemplate")):
            problems.append(f"available_node_types.{name}.node_config: no SecurityGroupIds, so Ray creates a "
                            "security group that allows SSH from 0.0.0.0/0; set SecurityGroupIds to a group "
                            "you created (see the setup steps in cluster.yaml)")
    return problems


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[dict[str, Any], str], list[str]]


RULES = (
    Rule("usage-header", check_usage_header),
    Rule("token-auth", check_token_auth),
    Rule("head-dashboard-loopback", check_head_dashboard_loopback),
    Rule("no-public-dashboard", check_no_public_dashboard),
    Rule("ray-ports-not-public", check_ray_ports_not_public),
    Rule("ssh-not-world", check_ssh_not_world),
    Rule("aws-security-group-pinned", check_aws_security_group_pinned),
)


def lint_cluster_config(config: dict[str, Any], text: str = "") -> list[str]:
    """Return every safety problem in a cluster config, as '[rule] key: value ...; fix' lines.

    Args:
        config: The config as the launcher will run it (pass it through `prepare_config` first, so
            keys left out are filled from Ray's defaults and checked too).
        text: The file's text, for the usage-header rule.
    """
    return [f"[{rule.name}] {problem}" for rule in RULES for problem in rule.check(config, text)]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail on any outgoing connection or DNS lookup."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access during an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text), text


def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    return prepare_config(copy.deepcopy(raw))


@pytest.fixture(scope="module")
def aws() -> tuple[dict[str, Any], str]:
    return load(AWS_FILE)


@pytest.fixture(scope="module")
def local() -> tuple[dict[str, Any], str]:
    return load(LOCAL_FILE)


# --- every shipped cluster file ---------------------------------------------------------------------


def test_both_cluster_files_are_shipped() -> None:
    assert {p.name for p in CLUSTER_FILES} >= {"cluster.yaml", "cluster.local.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_passes_rays_validator_offline(path: Path, no_network: None) -> None:
    raw, _ = load(path)
    config = prepare_config(raw)
    validate_config(config)
    # prepare_config must not have invented a head type or dropped ours.
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_is_safe_by_default(path: Path, no_network: None) -> None:
    raw, text = load(path)
    assert lint_cluster_config(prepared(raw), text) == []


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_key_is_commented(path: Path) -> None:
    """Each key down to node_config fields has a comment right above it, like Ray's example configs.

    Deeper keys (the inside of BlockDeviceMappings, IamInstanceProfile) share their parent's comment.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    bare = [
        f"line {i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if (m := re.match(r"^( *)([A-Za-z_][\w.\-]*|\"[^\"]+\"):", line))
        and len(m.group(1)) <= 12
        and (i == 0 or not lines[i - 1].lstrip().startswith("#"))
    ]
    assert bare == [], f"{path.name}: keys without a comment above them: {bare}"


def test_no_network_guard_is_armed(no_network: None) -> None:
    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("203.0.113.1", 6379))


# --- each rule can fail ---------------------------------------------------------------------------


def _replace_in_commands(
    old: str, new: str, keys: tuple[str, ...] = ("head_start_ray_commands", "worker_start_ray_commands")
) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        for key in keys:
            config[key] = [cmd.replace(old, new) for cmd in config.get(key, [])]

    return mutate


def _add_ingress(**rule: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        group = config["provider"].setdefault("security_group", {"GroupName": "qlora-sweep"})
        group.setdefault("IpPermissions", []).append(rule)

    return mutate


def _drop_key(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        config.pop(key)

    return mutate


def _drop_security_group(node_type: str) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        config["available_node_types"][node_type]["node_config"].pop("SecurityGroupIds")

    return mutate


# (id, change to the AWS config, rule expected to fire, message that must name the key and value)
UNSAFE_VARIANTS = [
    ("dashboard-on-all-interfaces", _replace_in_commands("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
     "no-public-dashboard", r"head_start_ray_commands\[1\]: --dashboard-host=0\.0\.0\.0"),
    ("head-dashboard-on-ipv6-any", _replace_in_commands("--dashboard-host=127.0.0.1", "--dashboard-host ::"),
     "head-dashboard-loopback", r"head_start_ray_commands\[1\]: .* with --dashboard-host=::;"),
    ("head-dashboard-host-left-out", _replace_in_commands("--dashboard-host=127.0.0.1", ""),
     "head-dashboard-loopback", r"head_start_ray_commands\[1\]: .* with no --dashboard-host"),
    ("head-without-token", _replace_in_commands("export RAY_AUTH_MODE=token;", ""),
     "token-auth", r"head_start_ray_commands\[1\]: .* with no RAY_AUTH_MODE"),
    ("worker-auth-disabled",
     _replace_in_commands("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled", keys=("worker_start_ray_commands",)),
     "token-auth", r"worker_start_ray_commands\[1\]: .* with RAY_AUTH_MODE=disabled"),
    ("start-commands-left-to-ray-defaults", _drop_key("head_start_ray_commands"),
     "no-public-dashboard", r"head_start_ray_commands\[1\]: --dashboard-host=0\.0\.0\.0"),
    ("dashboard-port-to-world", _add_ingress(IpProtocol="tcp", FromPort=8265, ToPort=8265,
                                             IpRanges=[{"CidrIp": "0.0.0.0/0"}]),
     "ray-ports-not-public", r"IpPermissions\[0\]: ports 8265-8265 from 0\.0\.0\.0/0 open dashboard \(8265\)"),
    ("gcs-port-to-world-v6", _add_ingress(IpProtocol="tcp", FromPort=6379, ToPort=6379,
                                          Ipv6Ranges=[{"CidrIpv6": "::/0"}]),
     "ray-ports-not-public", r"IpPermissions\[0\]: ports 6379-6379 from ::/0 open GCS \(6379\)"),
    ("range-covering-ray-client", _add_ingress(IpProtocol="tcp", FromPort=10000, ToPort=10100,
                                               IpRanges=[{"CidrIp": "0.0.0.0/0"}]),
     "ray-ports-not-public", r"ports 10000-10100 from 0\.0\.0\.0/0 open Ray Client \(10001\)"),
    ("all-traffic-to-world", _add_ingress(IpProtocol="-1", IpRanges=[{"CidrIp": "0.0.0.0/0"}]),
     "ray-ports-not-public", r"ports 0-65535 from 0\.0\.0\.0/0 open GCS \(6379\), dashboard \(8265\), "
                             r"Ray Client \(10001\)"),
    ("ssh-to-world", _add_ingress(IpProtocol="tcp", FromPort=22, ToPort=22, IpRanges=[{"CidrIp": "0.0.0.0/0"}]),
     "ssh-not-world", r"IpPermissions\[0\]: SSH \(22\) from 0\.0\.0\.0/0"),
    ("worker-without-own-security-group", _drop_security_group("ray.worker.gpu-48gb"),
     "aws-security-group-pinned", r"available_node_types\.ray\.worker\.gpu-48gb\.node_config: no SecurityGroupIds"),
]


@pytest.mark.parametrize(("mutate", "rule", "message"), [v[1:] for v in UNSAFE_VARIANTS],
                         ids=[v[0] for v in UNSAFE_VARIANTS])
def test_lint_reports_unsafe_variant(aws: tuple[dict[str, Any], str], mutate: Callable[[dict[str, Any]], None],
                                     rule: str, message: str) -> None:
    raw, text = aws
    variant = copy.deepcopy(raw)
    mutate(variant)
    problems = lint_cluster_config(prepared(variant), text)
    assert any(p.startswith(f"[{rule}]") and re.search(message, p) for p in problems), problems


def test_lint_allows_narrow_ssh_and_intra_cluster_rules(aws: tuple[dict[str, Any], str]) -> None:
    raw, text = aws
    variant = copy.deepcopy(raw)
    _add_ingress(IpProtocol="tcp", FromPort=22, ToPort=22, IpRanges=[{"CidrIp": "203.0.113.7/32"}])(variant)
    _add_ingress(IpProtocol="-1", UserIdGroupPairs=[{"GroupId": "sg-0123456789abcdef0"}])(variant)
    assert lint_cluster_config(prepared(variant), text) == []


def test_lint_reports_missing_usage_header(aws: tuple[dict[str, Any], str]) -> None:
    raw, text = aws
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    problems = lint_cluster_config(prepared(raw), body)
    assert any(p.startswith("[usage-header]") and "'ray up', 'ray submit', 'ray down'" in p for p in problems)


def test_every_rule_has_a_failing_example() -> None:
    exercised = {v[2] for v in UNSAFE_VARIANTS} | {"usage-header"}
    assert exercised == {rule.name for rule in RULES}


# --- cluster.yaml (AWS) -----------------------------------------------------------------------------


def test_aws_gpu_workers_declare_gpu_and_memory_class(aws: tuple[dict[str, Any], str]) -> None:
    raw, _ = aws
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["max_workers"] == 0
    assert "GPU" not in types[raw["head_node_type"]]["resources"]
    assert types["ray.worker.gpu-24gb"]["resources"] == {"GPU": 1, "gpu_mem_24gb": 1}
    assert types["ray.worker.gpu-48gb"]["resources"] == {"GPU": 1, "gpu_mem_24gb": 1, "gpu_mem_48gb": 1}
    assert sum(t.get("max_workers", 0) for t in types.values()) <= raw["max_workers"]


def test_aws_syncs_repo_and_token_and_installs_from_the_synced_tree(aws: tuple[dict[str, Any], str]) -> None:
    raw, text = aws
    assert raw["file_mounts"] == {"~/qlora-sweep": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    setup = " ; ".join(raw["setup_commands"])
    assert 'pip install --quiet -e "$HOME/qlora-sweep[gpu,dashboard]"' in setup
    assert "torch==" not in setup, "the CPU torch pin belongs to the Makefile, never to a GPU node"
    assert "RAY_AUTH_TOKEN=" not in text, "the token travels as a file, never inline"
    assert "aws_access_key_id" not in text.lower() and "AKIA" not in text


def test_aws_usage_header_shows_tmux_dashboard_and_attach(aws: tuple[dict[str, Any], str]) -> None:
    _, text = aws
    for cmd in ("ray submit --tmux cluster.yaml", "ray dashboard cluster.yaml", "ray attach", "ray down cluster.yaml"):
        assert cmd in text


# --- cluster.local.yaml -----------------------------------------------------------------------------


def test_local_is_a_single_loopback_head(local: tuple[dict[str, Any], str]) -> None:
    raw, _ = local
    assert raw["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert raw["auth"] == {"ssh_user": "root", "ssh_private_key": "~/.ssh/qlora_sweep_e2e"}
    assert raw["worker_start_ray_commands"] == []
    config = prepared(raw)
    (node_type,) = config["available_node_types"].values()
    assert node_type["max_workers"] == 0


def test_local_head_start_stays_on_loopback_with_a_token(local: tuple[dict[str, Any], str]) -> None:
    raw, _ = local
    commands = raw["head_start_ray_commands"]
    start = next(i for i, cmd in enumerate(commands) if _ray_start_position(cmd) is not None)
    generate = next(i for i, cmd in enumerate(commands) if "ray get-auth-token --generate" in cmd)
    assert generate < start, "ray start --head with RAY_AUTH_MODE=token needs the token file first"
    assert ">/dev/null" in commands[generate], "the token must not land in ray up's output"
    cmd = commands[start]
    for flag in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", "--node-ip-address=127.0.0.1",
                 "--port=${QLORA_SWEEP_E2E_GCS_PORT:-6379}", "--dashboard-port=${QLORA_SWEEP_E2E_DASHBOARD_PORT:-8265}",
                 "--num-cpus=2", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in cmd


def test_local_documents_ssh_port_and_login_shell_environment(local: tuple[dict[str, Any], str]) -> None:
    _, text = local
    assert re.search(r"Host 127\.0\.0\.1\n#\s+Port 2222", text)
    for line in ('export PATH="REPO/.venv/bin:$PATH"', "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
                 "export RAY_AUTH_MODE=token"):
        assert line in text
    for cmd in ("ray up -y cluster.local.yaml", "ray submit cluster.local.yaml sweeps/sweep.py -- --config "
                "sweeps/smoke.yaml", "ray down -y cluster.local.yaml"):
        assert cmd in text
