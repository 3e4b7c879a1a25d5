"""The README as a document other files must back: the tests it cites as evidence exist, and
its relative links lead to files of the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Names the README uses that look like tests but are not: CIFAR-10's test batch file, the
# aug.test_flip key, and a family of tests named by its common prefix.
NOT_TESTS = {"test_batch", "test_flip", "test_a_closed_stdout_"}


def test_every_test_the_readme_cites_exists():
    cited = set(re.findall(r"\btest_[a-z0-9_]+", README)) - NOT_TESTS
    source = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("*.py"))
    defined = set(re.findall(r"def (test_[a-z0-9_]+)", source))
    modules = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert cited, "no test cited: the pattern no longer matches the README"
    assert sorted(cited - defined - modules) == []  # renamed or removed, still cited as evidence
    prefixes = [p for p in NOT_TESTS if p.endswith("_")]
    assert all(any(name.startswith(p) for name in defined) for p in prefixes)


def test_every_relative_link_of_the_readme_exists():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert local, "no relative link found: the pattern no longer matches the README"
    assert [t for t in local if not (ROOT / t).exists()] == []
