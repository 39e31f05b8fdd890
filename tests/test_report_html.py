"""report.html in a real browser: headless Chromium renders it offline, without console errors, and not blank."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis.report import write_report
from tests.conftest import RecordedSweep

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed from Debian's archive when missing, skipped only when that fails."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True, text=True, env=env,
        timeout=600,
    )
    if install.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
        install = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True, text=True,
            env=env, timeout=600,
        )
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"chromium could not be installed: {install.stderr.strip()[-300:]}")
    return found


def render(chromium: str, page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_messages(result: subprocess.CompletedProcess) -> list[str]:
    """Messages the page logged (errors, failed loads, uncaught exceptions): Chromium's CONSOLE log lines."""
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def test_the_console_detector_catches_a_broken_page(chromium: str, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>noSuchFunction();</script></body></html>")
    messages = console_messages(render(chromium, page, tmp_path, "--dump-dom"))
    assert any("noSuchFunction is not defined" in m for m in messages), messages


def test_report_renders_offline_without_errors_and_is_not_blank(
    chromium: str, recorded_sweep: RecordedSweep, tmp_path: Path
) -> None:
    from PIL import Image, ImageStat

    out = tmp_path / "report"
    write_report(str(recorded_sweep.path), out_dir=str(out))
    page = out / "report.html"

    dom = render(chromium, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom) == []
    assert 'data-report-ready="1"' in dom.stdout  # the page's script ran to its end
    assert dom.stdout.count("<tr") >= 4 + 1  # the trials table has a row per trial

    screenshot = tmp_path / "report.png"
    shot = render(chromium, page, tmp_path, f"--screenshot={screenshot}", "--window-size=1400,3000")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert console_messages(shot) == []
    image = Image.open(screenshot).convert("L")
    assert image.size == (1400, 3000)
    assert ImageStat.Stat(image).stddev[0] > 20, "the screenshot is (nearly) blank"
    # Charts are drawn: many distinct grey levels, not just text on a background.
    assert len(set(image.getdata())) > 100
