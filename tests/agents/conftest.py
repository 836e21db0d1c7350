"""Real agent CLIs for the `agent_cli` suite (`make test-agents`), installed from npm at test time.

`claude_code` is the path of a Claude Code binary of the pinned version, installed with the
system's `npm` into `.alephant/agents/` (git-ignored) and reused while its version matches. The
npm package carries its native binary as a platform optional dependency, so npm's registry is the
only network it needs; nothing is installed globally. Without `npm`, or when the registry is
unreachable, the suite fails with what to do (CI must not pass without having run it).
"""

from __future__ import annotations

import fcntl
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

CLAUDE_CODE_PACKAGE: Final = "@anthropic-ai/claude-code"
CLAUDE_CODE_VERSION: Final = "2.1.332"
AGENTS_DIR: Final = Path(__file__).resolve().parents[2] / ".alephant" / "agents"
NPM_TIMEOUT_S: Final = 480  # the package's native binary is ~400 MB


def _platform_package() -> str:
    """The optional dependency holding the native binary for this machine (see the package's install.cjs)."""
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower(),
                                                                                          platform.machine())
    system = {"linux": "linux", "darwin": "darwin"}.get(sys.platform, sys.platform)
    musl = system == "linux" and "musl" in (platform.libc_ver()[0] or "musl")
    return f"{CLAUDE_CODE_PACKAGE}-{system}-{machine}{'-musl' if musl else ''}"


def _candidates(prefix: Path) -> list[Path]:
    """Where the binary is after an install: the wrapper's `bin/claude.exe` (its postinstall puts the
    native binary there), else the platform package's own (when npm skipped install scripts)."""
    modules = prefix / "node_modules"
    return [modules / CLAUDE_CODE_PACKAGE / "bin" / "claude.exe", modules / _platform_package() / "claude"]


def _working_binary(prefix: Path) -> Path | None:
    for path in _candidates(prefix):
        if not path.is_file():
            continue
        try:
            done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60, check=False,
                                  env={"PATH": "/usr/bin:/bin", "HOME": str(prefix), "DISABLE_AUTOUPDATER": "1"})
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.startswith(CLAUDE_CODE_VERSION):
            return path
    return None


def install_claude_code(prefix: Path = AGENTS_DIR) -> Path:
    """The Claude Code binary of CLAUDE_CODE_VERSION under `prefix`, installed from npm unless an
    earlier run left it there. Serialised across processes by a lock file. Fails the test with
    instructions when npm is missing or the install fails."""
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _working_binary(prefix)
        if found is not None:
            return found
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("The agent CLI tests install Claude Code from npm, and `npm` is not on PATH. Install "
                        "Node.js and npm (Debian/Ubuntu: `sudo apt-get install -y npm`), then run "
                        "`make test-agents` again.", pytrace=False)
        spec = f"{CLAUDE_CODE_PACKAGE}@{CLAUDE_CODE_VERSION}"
        try:
            done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                                   "--loglevel=error", spec], capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`npm install {spec}` did not finish within {NPM_TIMEOUT_S}s: is the npm registry "
                        "reachable (`npm view @anthropic-ai/claude-code version`)?", pytrace=False)
        if done.returncode != 0:
            pytest.fail(f"`npm install {spec}` failed (exit {done.returncode}); the agent CLI tests need the npm "
                        "registry (check `npm view @anthropic-ai/claude-code version`, a proxy or "
                        f"`npm config get registry`):\n{done.stderr[-2000:]}", pytrace=False)
        found = _working_binary(prefix)
        if found is None:
            pytest.fail(f"`npm install {spec}` succeeded, but no runnable Claude Code {CLAUDE_CODE_VERSION} binary "
                        f"is in {prefix} (looked at {', '.join(map(str, _candidates(prefix)))}; this machine's "
                        f"platform package is {_platform_package()}).", pytrace=False)
        return found


@pytest.fixture(scope="session")
def claude_code() -> Iterator[Path]:
    yield install_claude_code()
