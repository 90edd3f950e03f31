"""Every shell command the README shows runs as pasted, from a fresh clone after the set-up.

What runs: every ```bash block of README.md, in order, as one bash session (``set -euo pipefail``), so a
block may use what an earlier one made (``runs/head``) or set up (``source .venv/bin/activate``). The
session starts in a scratch folder that looks like a fresh clone after ``make``: a link to each tracked
top-level entry of the repository, ``.venv`` linking to the environment running this test, and
``PATH`` without that environment's ``bin`` (so the README's own activation step is what finds
``vocabtrim``). No ``RAY_ADDRESS`` and no ``RAY_AUTH_*`` variables: a local Ray as a user gets it.

What does not run: a block right after a ``<!-- readme-test: skip (reason) -->`` line, because it needs
what CI does not have (a cloud account, Kubernetes) or is the set-up itself; the reason must be given,
and ```text blocks are synopses, not commands.

Sizes (the one liberty taken, to keep this at a minute or two on 2 cores): before running, the
``SIZES`` substitutions below are applied to the commands' text, and each must match at least once, so
a README edit that drops one shows up here. Flags, paths, models and the order of the commands are
the README's own.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->")
SMALL_PROMPTS = 24
SIZES = [
    (r"--max-new-tokens \d+", "--max-new-tokens 4"),  # tokens per row
    (r"vocabtrim/data/prompts\.parquet", "small/prompts.parquet"),  # its first 24 rows
    (r"--mb 24 --repeat 3", "--mb 0.5 --repeat 1"),  # the calibrate benchmark's corpus and repeats
]


def bash_blocks(text: str) -> list[tuple[str, str | None]]:
    """``(commands, skip reason or None)`` for each ```bash block, in order."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "```bash":
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.fullmatch(before.strip())
        blocks.append(("\n".join(lines[i + 1 : end]), marker["reason"].strip() if marker else None))
    return blocks


def test_the_readme_marks_every_block_it_does_not_run_with_a_reason():
    text = (ROOT / "README.md").read_text()
    blocks = bash_blocks(text)
    assert text.count("readme-test: skip") == sum(reason is not None for _, reason in blocks)  # no stray markers
    run = [b for b, reason in blocks if reason is None]
    assert any("vocabtrim calibrate" in b for b in run) and any("vocabtrim generate" in b for b in run)
    assert not any(re.search(r"\bMODEL\b|REGISTRY|my-bucket", b) for b in run), "placeholders in a block that runs"


def readme_section_for_docs(readme: str, title: str) -> str:
    """A README section as a page in docs/ holds it: the section (its heading to the next), without the README
    test's markers, its relative links made relative to docs/."""
    start = readme.index(f"\n## {title}\n") + 1
    end = readme.find("\n## ", start + 1)
    section = readme[start:] if end < 0 else readme[start : end + 1]
    section = re.sub(r"^<!-- readme-test: .*-->\n", "", section, flags=re.M)

    def link(m):
        target = m.group(1)
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        return f"]({target[len('docs/'):] if target.startswith('docs/') else '../' + target})"

    return re.sub(r"\]\(([^)]+)\)", link, section).rstrip("\n") + "\n"


def test_docs_cluster_md_is_the_readme_s_section():
    """docs/cluster.md (the link target of the cluster configs' comments) holds the README's section as it is."""
    page = (ROOT / "docs" / "cluster.md").read_text()
    want = readme_section_for_docs((ROOT / "README.md").read_text(), "Running on a cluster")
    assert page == CLUSTER_PAGE_HEADER + want, "docs/cluster.md differs from the README's section: write it again from it"


CLUSTER_PAGE_HEADER = "<!-- The \"Running on a cluster\" section of README.md, kept here for direct links. -->\n"


def scratch_clone(tmp_path: Path) -> Path:
    work = tmp_path / "clone"
    work.mkdir()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = {p.split("/")[0] for p in tracked.stdout.split()} if tracked.returncode == 0 else set(os.listdir(ROOT))
    for name in sorted(names - {".venv"}):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "small").mkdir()
    table = pq.read_table(ROOT / "vocabtrim" / "data" / "prompts.parquet")
    pq.write_table(table.slice(0, SMALL_PROMPTS), work / "small" / "prompts.parquet")
    return work


@pytest.mark.bundled
@pytest.mark.timeout(1200)  # the script's own limit (900 s, below) ends it first
def test_the_readme_commands_run_as_pasted(tmp_path):
    blocks = [b for b, reason in bash_blocks((ROOT / "README.md").read_text()) if reason is None]
    script = []
    for i, block in enumerate(blocks):
        script += [f"echo \"--- README block {i + 1}/{len(blocks)} at $SECONDS s\" >&2", block]
    script = "\n".join(script)
    for pattern, replacement in SIZES:
        script, n = re.subn(pattern, replacement, script)
        assert n, f"the README no longer has {pattern!r}: update SIZES"
    work = scratch_clone(tmp_path)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    assert (work / "runs" / "head" / "head.safetensors").is_file()
    assert pq.read_metadata(work / "runs" / "generated" / "prompts.parquet").num_rows == SMALL_PROMPTS
    assert "Token authentication" not in proc.stderr
