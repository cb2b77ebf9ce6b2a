"""Every ```python block of README.md and docs/ runs as written.

The blocks of one page run in order, as one script in a fresh `python` process, so a
later block may use the names an earlier one defined; the page starts its own workers
and ends with its last block. The script keeps each block at its line number in the
page, so a traceback's line numbers are the page's. A block that cannot run alone
carries the line `<!-- not run: <reason> -->` directly above its fence; such blocks
are few. The page runs under a watcher that adopts the page's orphaned processes
(Linux's child subreaper): a worker or helper that outlives its master fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from devtools import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:(?P<reason>.*?)-->")
# At most this share of all blocks may be marked not run.
MAX_NOT_RUN_SHARE = 0.10
PAGE_TIMEOUT = 150  # seconds a page's script may take
LEFT_BEHIND_EXIT = 86  # the watcher's exit status when processes outlived the page
EXIT_GRACE = 15  # seconds the page's workers get to exit after it ended


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, counted from 1
    code: str
    not_run: str | None  # the reason, when marked not run

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, with the not-run reason written above each."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*(\S*)", lines[i])
        if fence is None:
            i += 1
            continue
        ticks, lang = fence[1], fence[2]
        end = i + 1
        while end < len(lines) and not lines[end].startswith(ticks):
            end += 1
        if lang == "python":
            marker = NOT_RUN.fullmatch(lines[i - 1].strip()) if i > 0 else None
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1:end]),
                                marker["reason"].strip() if marker else None))
        i = end + 1
    return blocks


def page_script(blocks: list[Block]) -> str:
    """The page's runnable blocks as one script, each block's lines at their page lines."""
    out: list[str] = []
    for block in blocks:
        if block.not_run is not None:
            continue
        out.extend("" for _ in range(block.line - len(out)))
        out.extend(block.code.splitlines())
    return "\n".join(out) + "\n"


ALL_BLOCKS = [b for page in PAGES for b in python_blocks(page)]
RUN_PAGES = [p for p in PAGES if any(b.page == p and b.not_run is None for b in ALL_BLOCKS)]

# Runs the page's script (argv[1]) as a child, adopting whatever it leaves behind: once
# the page has exited, every process still alive under this one argv[2] seconds later
# outlived its master.
WATCHER = f"""
import ctypes, os, signal, subprocess, sys, time

PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

def children():
    found = {{}}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{{entry}}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{{entry}}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found[int(entry)] = cmdline
    return found

def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return

try:
    status = subprocess.run([sys.executable, sys.argv[1]], timeout={PAGE_TIMEOUT}).returncode
except subprocess.TimeoutExpired:
    print("the page did not finish within {PAGE_TIMEOUT} s", file=sys.stderr)
    status = 1
deadline = time.monotonic() + float(sys.argv[2])
while True:
    reap()
    left = children()
    if not left:
        break
    if time.monotonic() > deadline:
        for pid, cmdline in left.items():
            print(f"left behind: {{pid}} {{cmdline}}", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        reap()
        sys.exit({LEFT_BEHIND_EXIT})
    time.sleep(0.05)
sys.exit(status)
"""


def run_watched(script: Path, grace: float = EXIT_GRACE) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", WATCHER, str(script), str(grace)], cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=PAGE_TIMEOUT + grace + 15, check=False)


def failed_block(blocks: list[Block], script: str, stderr: str) -> str:
    """Which block the traceback's last line of the script falls in."""
    lines = [int(n) for n in re.findall(rf'File "{re.escape(script)}", line (\d+)', stderr)]
    if not lines:
        return "no block named in the traceback"
    at = lines[-1]
    owner = [b for b in blocks if b.not_run is None and b.line < at]
    return f"the block at {owner[-1].where} failed, at line {at}" if owner else f"line {at}"


@pytest.mark.timeout(PAGE_TIMEOUT + EXIT_GRACE + 30)
@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_page_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = python_blocks(page)
    script = tmp_path / f"page_{page.stem}.py"  # a prefix: no page shadows a module
    script.write_text(page_script(blocks))
    result = run_watched(script)
    output = (result.stdout + result.stderr).replace(str(script), str(page.relative_to(ROOT)))
    status = result.returncode
    assert status != LEFT_BEHIND_EXIT, f"{page.name}: processes outlived the page:\n{output}"
    assert status == 0, f"{failed_block(blocks, str(script), result.stderr)}:\n{output}"


def test_the_run_pages_are_found() -> None:
    # Guards the parser: the README and the quickstart have blocks that run.
    assert ROOT / "README.md" in RUN_PAGES
    assert ROOT / "docs" / "quickstart.md" in RUN_PAGES
    assert len(ALL_BLOCKS) >= 30


def test_not_run_blocks_say_why_and_are_few() -> None:
    not_run = [b for b in ALL_BLOCKS if b.not_run is not None]
    for block in not_run:
        assert block.not_run, f"{block.where}: a not-run block must give its reason"
    assert len(not_run) <= MAX_NOT_RUN_SHARE * len(ALL_BLOCKS), (
        f"{len(not_run)} of {len(ALL_BLOCKS)} blocks are not run: "
        + ", ".join(b.where for b in not_run))


def test_every_not_run_marker_sits_above_a_python_block() -> None:
    marked = {(b.page, b.line - 1) for b in ALL_BLOCKS if b.not_run is not None}
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), start=1):
            if NOT_RUN.search(line) or line.lstrip().startswith("<!-- not run"):
                assert (page, n) in marked, (
                    f"{page.relative_to(ROOT)}:{n}: a not-run marker must be the line "
                    "directly above a ```python fence")


def test_the_parser_reads_markers_fences_and_line_numbers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n```python\na = 1\n```\n\n<!-- not run: needs a cluster -->\n"
                    "```python\nb = 2\n```\n````md\n```python\nnot a block\n```\n````\n"
                    "```bash\necho\n```\n```python\nc = a\n```\n")
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.not_run) for b in blocks] == [
        (2, "a = 1", None), (7, "b = 2", "needs a cluster"), (18, "c = a", None)]
    script = page_script(blocks).splitlines()
    assert script[2] == "a = 1" and script[18] == "c = a" and "b = 2" not in script


@pytest.mark.timeout(60)
def test_the_watcher_catches_a_process_that_outlives_the_page(tmp_path: Path) -> None:
    # A child in a session of its own survives its parent's exit, as a stray worker would.
    script = tmp_path / "stray.py"
    script.write_text("import subprocess, sys\n"
                      "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                      "print('stray', p.pid)\n")
    result = run_watched(script, grace=1)
    assert result.returncode == LEFT_BEHIND_EXIT, result.stdout + result.stderr
    stray = int(result.stdout.split()[-1])
    assert f"left behind: {stray} sleep 300" in result.stderr
    assert not os.path.exists(f"/proc/{stray}"), "the watcher kills and reaps what it caught"


@pytest.mark.timeout(60)
def test_a_failing_block_is_named_by_its_page_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\ntext\n\n```python\ny = x +\\\n    z\n```\n")
    blocks = python_blocks(page)
    script = tmp_path / "page.py"
    script.write_text(page_script(blocks))
    result = run_watched(script, grace=1)
    assert result.returncode == 1
    assert "NameError: name 'z'" in result.stderr
    assert failed_block(blocks, str(script), result.stderr) == (
        f"the block at {page}:7 failed, at line 9")


def test_readme_opens_with_a_title_a_paragraph_and_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    title, paragraph, commands, after = re.split(r"\n\n+", text, maxsplit=3)
    assert title == "# fastdist"
    assert not paragraph.startswith(("#", "```", "-")), "one paragraph says what fastdist is"
    assert commands.startswith("```bash\npip install . && python examples/pmap_demo.py")
    assert "\nbash tests/run.sh " in commands, "the test command CI runs (.ci/run)"
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
    assert after.startswith("Start with the [quickstart](docs/quickstart.md)")
