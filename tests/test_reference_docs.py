"""docs/reference.md against the code: every command's flags and every manifest field.

* Flags: for each command, the rows of its flag table (`| `--flag` | default | meaning |`
  under `## cm-embed` etc.) must name exactly the flags of its argparse parser, with
  the parser's default. A flag added to a parser without a row (or a row left after a
  flag is removed) fails naming the flag, the parser and the section.
* Manifests: the fields of each `### ... manifest` table must be exactly the keys a
  real run writes. Top-level keys are rows like `` `counts` ``; a row `` `counts.read` ``
  says that `counts` is documented key by key, and then its keys must match too.
  cm-cluster and cm-select run on tiny inputs (seconds); the nightly job (which also
  writes cm-embed's manifest and nightly.json) runs the demo on a small pool (slow).

`python tests/test_reference_docs.py` prints each command's flag table as the test
expects it (the meaning column from the parser's help), to paste into the doc.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Set

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE = os.path.join(ROOT, "docs", "reference.md")

# command -> (module, the function that builds its parser)
COMMANDS = {
    "cm-embed": ("pipelines.embed_pool", "build_parser"),
    "cm-cluster": ("pipelines.build_clusters", "build_parser"),
    "cm-select": ("pipelines.select_batch", "build_parser"),
    "cm-nightly": ("pipelines.nightly", "build_parser"),
}

FLAG_ROW = re.compile(r"^\|\s*`(--[A-Za-z0-9_-]+)[^`]*`\s*\|\s*([^|]*?)\s*\|")
FIELD_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|")


def _parser(command: str) -> argparse.ArgumentParser:
    import importlib

    module, fn = COMMANDS[command]
    return getattr(importlib.import_module(module), fn)()


def parser_flags(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Long option -> action, without --help."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt] = action
    return out


def render_default(action: argparse.Action) -> str:
    """The default as the reference writes it."""
    if action.required:
        return "required"
    value = action.default
    if value is None or value == [] or value is argparse.SUPPRESS:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _sections(path: str) -> Dict[str, List[str]]:
    """Heading text (without #'s) -> the lines up to the next heading of any level."""
    sections: Dict[str, List[str]] = {}
    current = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^(#+)\s+(.*?)\s*$", line)
            if m:
                current = m.group(2).strip("` ")
                sections[current] = []
            elif current is not None:
                sections[current].append(line.rstrip("\n"))
    return sections


def documented_flags(command: str) -> Dict[str, str]:
    """Flag -> default cell of the flag table under the command's heading."""
    sections = _sections(REFERENCE)
    heading = f"{command} flags"
    assert heading in sections, f"{REFERENCE} has no section '## {heading}'"
    rows = {}
    for line in sections[heading]:
        m = FLAG_ROW.match(line)
        if m:
            flag, default = m.group(1), m.group(2).strip().strip("`")
            assert flag not in rows, f"{REFERENCE}, section '{heading}': {flag} is listed twice"
            rows[flag] = default
    return rows


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_reference_lists_exactly_the_parser_flags(command):
    module, fn = COMMANDS[command]
    flags = parser_flags(_parser(command))
    documented = documented_flags(command)
    where = f"docs/reference.md, section '## {command} flags'"
    missing = sorted(set(flags) - set(documented))
    extra = sorted(set(documented) - set(flags))
    problems = [f"{flag} is a flag of {module}.{fn}() but has no row in {where}; add "
                f"| `{flag}` | {render_default(flags[flag])} | {flags[flag].help or '...'} |" for flag in missing]
    problems += [f"{flag} has a row in {where} but {module}.{fn}() has no such flag; remove the row"
                 for flag in extra]
    for flag in sorted(set(flags) & set(documented)):
        want = render_default(flags[flag])
        if documented[flag] != want:
            problems.append(f"{flag}: {where} gives the default {documented[flag]!r}, {module}.{fn}() has {want!r}")
    assert not problems, "\n".join(problems)


# --- manifests -----------------------------------------------------------------

def documented_fields(heading: str) -> Set[str]:
    sections = _sections(REFERENCE)
    assert heading in sections, f"{REFERENCE} has no section '### {heading}'"
    return {m.group(1) for m in map(FIELD_ROW.match, sections[heading]) if m}


def check_fields(heading: str, manifest: Dict, path: str) -> None:
    documented = documented_fields(heading)
    expanded = {f.split(".", 1)[0] for f in documented if "." in f}
    written = set(manifest)
    for key in expanded:
        if isinstance(manifest.get(key), dict):
            written |= {f"{key}.{sub}" for sub in manifest[key]}
    where = f"docs/reference.md, section '### {heading}'"
    missing = sorted(written - documented)
    extra = sorted(documented - written)
    problems = [f"{path} has the field {f!r}, which {where} does not list" for f in missing]
    problems += [f"{where} lists the field {f!r}, which {path} does not have" for f in extra]
    assert not problems, "\n".join(problems)


def _write_embeddings(path: str, n: int = 240, d: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 8, d))
    x = (centres[rng.integers(0, len(centres), n)] + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), n).astype(np.float32)
    top2 = np.sort(probs, axis=1)[:, -2:]
    table = pa.table({
        "example_id": [f"ex-{i:05d}" for i in range(n)],
        "embedding": pa.array(list(x), pa.list_(pa.float32())),
        "margin": pa.array(top2[:, 1] - top2[:, 0], pa.float32()),
    })
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def cluster_and_select_manifests(tmp_path_factory):
    from pipelines import build_clusters, select_batch

    base = tmp_path_factory.mktemp("reference")
    emb = base / "embeddings.parquet"
    _write_embeddings(str(emb))
    cluster = build_clusters.run(["--embeddings", str(emb), "--distance_threshold", "0.05",
                                  "--output_dir", str(base / "clusters"), "--runner=FnApiRunner"])
    select = select_batch.run(["--scores", str(emb), "--clusters", str(base / "clusters" / "clusters-*.parquet"),
                               "--batch_size", "20", "--margin_pool_size", "100",
                               "--output_dir", str(base / "batch"), "--runner=FnApiRunner"])
    return {"cluster": (cluster, str(base / "clusters" / "manifest.json")),
            "select": (select, str(base / "batch" / "manifest.json"))}


def _on_disk(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_cm_cluster_manifest_fields(cluster_and_select_manifests):
    returned, path = cluster_and_select_manifests["cluster"]
    check_fields("cm-cluster manifest.json", _on_disk(path), path)


def test_cm_select_manifest_fields(cluster_and_select_manifests):
    returned, path = cluster_and_select_manifests["select"]
    check_fields("cm-select manifest.json", _on_disk(path), path)


@pytest.mark.slow
def test_nightly_demo_manifest_fields(tmp_path):
    """One small demo night writes all four: cm-embed's, cm-cluster's and cm-select's
    manifest.json and the nightly summary."""
    from pipelines import nightly

    work = tmp_path / "work"
    nightly.run(["--demo", "--demo_size", "400", "--work_dir", str(work)])
    found = {
        "cm-embed manifest.json": glob.glob(str(work / "embeddings" / "*" / "manifest.json")),
        "cm-cluster manifest.json": glob.glob(str(work / "clusters" / "*" / "*" / "manifest.json")),
        "cm-select manifest.json": glob.glob(str(work / "batches" / "*" / "manifest.json")),
        "cm-nightly nightly.json": glob.glob(str(work / "batches" / "*" / "nightly.json")),
    }
    for heading, paths in found.items():
        assert len(paths) == 1, (heading, paths)
        check_fields(heading, _on_disk(paths[0]), paths[0])


def test_the_checks_catch_a_missing_flag_and_a_missing_field():
    """The comparisons above report an undocumented flag and an undocumented field."""
    parser = _parser("cm-cluster")
    parser.add_argument("--undocumented_flag_for_this_test", type=int, default=3)
    flags = parser_flags(parser)
    assert "--undocumented_flag_for_this_test" in set(flags) - set(documented_flags("cm-cluster"))
    with pytest.raises(AssertionError, match="'undocumented_field'"):
        check_fields("cm-select manifest.json", {"undocumented_field": 1}, "a manifest")


# --- references to the design document --------------------------------------------

DESIGN = os.path.join(ROOT, "docs", "design.md")


def test_design_references_name_existing_sections():
    """Code and README cite docs/design.md by section name ("The margin pool"): every
    name quoted right after such a citation (up to the closing parenthesis) must be a
    heading of docs/design.md, and nothing may cite the old DESIGN.md."""
    headings = set(_sections(DESIGN))
    files = [os.path.join(ROOT, "README.md")]
    for sub in ("cm_beam", "pipelines", "tests", "benchmarks", "deploy"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, sub)):
            files += [os.path.join(dirpath, n) for n in names if n.endswith((".py", ".md", ".sh", ".yaml"))]
    problems, cited = [], 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue  # this test names the old file on purpose
        if re.search(r"(?<![\w/])DESIGN\.md", text):
            problems.append(f"{rel} cites DESIGN.md; cite docs/design.md and a section name")
        flat = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)  # join lines, drop comment markers
        for m in re.finditer(r"docs/design\.md", flat):
            end = flat.find(")", m.end())
            for name in re.findall(r'"([^"]+)"', flat[m.end(): end if end >= 0 else m.end() + 200]):
                cited += 1
                if name not in headings:
                    problems.append(f"{rel} cites docs/design.md section {name!r}, which is not a heading of it")
    assert not problems, "\n".join(problems)
    assert cited >= 5  # the check above saw the citations


def print_tables() -> None:
    for command in COMMANDS:
        print(f"## {command} flags\n\n| flag | default | meaning |\n|---|---|---|")
        for flag, action in parser_flags(_parser(command)).items():
            meta = f" {action.metavar}" if isinstance(action.metavar, str) and action.metavar != "BOOL" else ""
            help_text = (action.help or "").replace("|", "\\|")
            if action.choices:
                help_text += f" Choices: {', '.join(map(str, action.choices))}."
            print(f"| `{flag}{meta}` | {render_default(action)} | {help_text} |")
        print()


if __name__ == "__main__":
    print_tables()
