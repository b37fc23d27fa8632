"""Every table and marked number of README.md, docs/*.md, scripts/*.md and benchmarks/README.md is regenerated
from its committed raw file and must equal the markdown (lit_gpt.doc_tables). Reads only the raw files: no model,
no data, fast."""
import json
import os

import pytest

from lit_gpt.doc_tables import (
    MAX_RAW_BYTES, ROOT, DocTableError, audit, binmean, duration, main, markdown_files, raw_files_used, raw_path,
    render_markdown, splice_region, update_files,
)

FILES = markdown_files()


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_markdown_equals_what_its_raw_files_render(path):
    text = path.read_text()
    assert render_markdown(text, str(path.relative_to(ROOT))) == text, (
        f"{path.relative_to(ROOT)} differs from its raw files: run `python -m lit_gpt.doc_tables --check` to see "
        "the difference, `python -m lit_gpt.doc_tables` to re-render (after a new measurement)")


def test_raw_files_are_small_committed_files():
    used = {p for f in FILES for p in raw_files_used(f.read_text())}
    assert used, "no markdown file names a raw file"
    for p in used:
        assert p.stat().st_size <= MAX_RAW_BYTES, f"{p.relative_to(ROOT)} is over {MAX_RAW_BYTES} bytes"


def _raw(tmp_path, name, obj):
    p = tmp_path / "docs" / "results" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


MD = """# Title
<!-- results: docs/results/r.json other=docs/results/m.csv
let:
  nat: inputs.natural
-->
Sink is <!-- v: {nat.sink_1:.2f} -->OLD<!-- /v -->% on natural text, {{not a field}} here, rows: <!-- v: {len(other)} -->9<!-- /v -->.

<!-- table:
header: [input, "Sink_1 (%)", loss]
rows:
  - for: k in ['natural', 'random']
    row: ["{k}", "**{inputs[k].sink_1:.1f}**", "{inputs[k].loss:.3f}"]
  - ["mean", "{mean([v.sink_1 for v in inputs.values()]):.1f}", "-"]
-->
stale
<!-- /table -->

<!-- table: docs/results/m.csv
header: [step, "val loss"]
rows:
  - for: r in m
    row: ["{r.step}", "{r.val_loss:.2f}"]
-->
<!-- /table -->
"""  # noqa: E501 (a markdown line of the fixture)


def test_tables_and_values_render_from_the_raw_files(tmp_path):
    _raw(tmp_path, "r.json", {"inputs": {"natural": {"sink_1": 70.2912, "loss": 3.76312},
                                          "random": {"sink_1": 76.6, "loss": 14.1}}})
    _raw(tmp_path, "m.csv", "step,val_loss\n0,5.7123\n900,1.7349\n")
    out = render_markdown(MD, root=tmp_path)
    assert "Sink is <!-- v: {nat.sink_1:.2f} -->70.29<!-- /v -->% on natural text, {{not a field}}" in out
    assert "rows: <!-- v: {len(other)} -->2<!-- /v -->." in out
    assert "| input | Sink_1 (%) | loss |\n|---|---|---|\n| natural | **70.3** | 3.763 |\n| random | **76.6** | " \
           "14.100 |\n| mean | 73.4 | - |\n<!-- /table -->" in out
    assert "| step | val loss |\n|---|---|\n| 0 | 5.71 |\n| 900 | 1.73 |\n<!-- /table -->" in out
    assert "stale" not in out and render_markdown(out, root=tmp_path) == out      # rendering is idempotent
    # a new measurement changes the raw file: the markdown no longer matches until it is re-rendered
    _raw(tmp_path, "r.json", {"inputs": {"natural": {"sink_1": 71.0, "loss": 3.7}, "random": {"sink_1": 1, "loss": 1}}})
    assert render_markdown(out, root=tmp_path) != out


def test_bad_raw_file_names_give_the_shared_one_line_error(tmp_path):
    # the whole lines (lit_gpt.utils.invalid_choice's wording)
    for spec, line in (
        ("/etc/passwd.json", "raw file='/etc/passwd.json' is invalid; allowed: a path under docs/results or "
                             "benchmarks/results"),
        ("docs/results/../../x.json", "raw file='docs/results/../../x.json' is invalid; allowed: a path under "
                                      "docs/results or benchmarks/results"),
        ("docs/results/r.yaml", "raw file='docs/results/r.yaml' is invalid; allowed: .json, .csv, .txt, .log files"),
    ):
        with pytest.raises(DocTableError) as e:
            raw_path(spec, root=tmp_path)
        assert str(e.value) == line


def test_bad_markers_fail_with_the_file_line_and_reason(tmp_path):
    _raw(tmp_path, "r.json", {"a": 1.5})
    with pytest.raises(DocTableError, match=r"x.md:2: .*does not exist"):
        render_markdown("t\n<!-- results: docs/results/missing.json -->\n", "x.md", root=tmp_path)
    with pytest.raises(DocTableError, match=r"allowed: a path under docs/results or benchmarks/results"):
        render_markdown("<!-- results: /etc/passwd.json -->", root=tmp_path)
    with pytest.raises(DocTableError, match=r"x.md:2: \{b:.2f\}: NameError"):
        render_markdown("<!-- results: docs/results/r.json -->\n<!-- v: {b:.2f} -->1<!-- /v -->", "x.md",
                        root=tmp_path)
    with pytest.raises(DocTableError, match="closing <!-- /table -->"):
        render_markdown("<!-- table: docs/results/r.json\nheader: [a]\nrows: [['{a}']]\n-->\n", root=tmp_path)
    with pytest.raises(DocTableError, match="must be a list of 2 cells"):
        render_markdown("<!-- table: docs/results/r.json\nheader: [a, b]\nrows: [['{a}']]\n-->\n<!-- /table -->",
                        root=tmp_path)
    with pytest.raises(DocTableError, match="NameError"):      # no builtins in expressions
        render_markdown("<!-- results: docs/results/r.json -->\n<!-- v: {__import__('os')} -->1<!-- /v -->",
                        root=tmp_path)


def test_helpers_and_audit():
    bins = {"width": 2, "sum": [1.0, 5.0, 9.0], "count": [2, 2, 1]}
    assert binmean(bins, 0, 4) == pytest.approx(6.0 / 4) and binmean(bins, 2, 5) == pytest.approx(14.0 / 3)
    with pytest.raises(ValueError, match="bin edges"):
        binmean(bins, 1, 4)
    assert duration(348.4) == "5 min 48 s" and duration(42) == "42 s"
    text = "a 12 b\n`3` <!-- v: {x} -->4<!-- /v --> ok\n```\n5\n```\n[l](p6.png)\n"
    assert audit(text) == [(1, "a 12 b")]


def test_cli_check_reports_a_stale_file(tmp_path, capsys, monkeypatch):
    md = tmp_path / "x.md"
    md.write_text("<!-- results: docs/results/demo_cpu/corpus_manifest.json -->\n"
                  "<!-- v: {len(prefixes)} -->-1<!-- /v -->\n")
    if not (ROOT / "docs/results/demo_cpu/corpus_manifest.json").is_file():
        pytest.skip("no demo record")
    assert main(["--check", str(md)]) == 1 and "(rendered)" in capsys.readouterr().out
    assert main([str(md)]) == 0 and main(["--check", str(md)]) == 0
    assert "-1" not in md.read_text() and os.path.getsize(md) > 0


def test_markers_in_code_blocks_are_examples(tmp_path):
    text = "x\n```markdown\n<!-- results: docs/results/missing.json -->\n<!-- v: {nope} -->1<!-- /v -->\n```\ny\n"
    assert render_markdown(text, root=tmp_path) == text and raw_files_used(text) == []


def test_a_value_marker_inside_inline_code_is_an_error_unless_an_example(tmp_path):
    _raw(tmp_path, "r.json", {"cmd": "python run.py --new"})
    head = "<!-- results: docs/results/r.json -->\n"
    # the stale command would never be re-rendered (and GitHub shows the comment): an error naming file and line
    for stale in ("`<!-- v: {cmd} -->python run.py --old<!-- /v -->`",
                  "`` <!-- v: {cmd} -->python run.py --old<!-- /v --> ``",
                  "run `it: <!-- v: {cmd} -->python run.py --old<!-- /v -->` now"):
        with pytest.raises(DocTableError, match=r"^x.md:3: a value marker inside an inline code span .*put the "
                                                r"backticks inside the template"):
            render_markdown(head + "text\n" + stale + "\n", "x.md", root=tmp_path)
    # the fix: backticks inside the template, rendered
    out = render_markdown(head + "run <!-- v: `{cmd}` -->`python run.py --old`<!-- /v -->.\n", root=tmp_path)
    assert out == head + "run <!-- v: `{cmd}` -->`python run.py --new`<!-- /v -->.\n"
    # a code span that closes before the marker does not hide it; the syntax as an example (no field) stays
    assert "`a` <!-- v: {cmd} -->python run.py --new<!-- /v -->" in render_markdown(
        head + "`a` <!-- v: {cmd} -->x<!-- /v -->\n", root=tmp_path)
    example = head + "- `<!-- v: TEMPLATE -->…<!-- /v -->` is a number inside a sentence\n"
    assert render_markdown(example, root=tmp_path) == example


def test_regions_of_other_renderers_are_spliced_checked_and_not_audited(tmp_path, capsys):
    text = "# T\n\nprose 7\n<!-- repro:sec:cpu:begin -->\nold 1\n<!-- repro:sec:cpu:end -->\nafter\n"
    new = splice_region(text, "repro", "sec:cpu", "| a | 2 |")
    assert new == "# T\n\nprose 7\n<!-- repro:sec:cpu:begin -->\n| a | 2 |\n<!-- repro:sec:cpu:end -->\nafter\n"
    assert splice_region(new, "repro", "sec:cpu", "| a | 2 |") == new                        # idempotent
    appended = splice_region("# T\n", "repro", "sec:gpu", "b 3", heading="## GPU")
    assert appended == "# T\n\n## GPU\n\n<!-- repro:sec:gpu:begin -->\nb 3\n<!-- repro:sec:gpu:end -->\n"
    # the digits a renderer wrote inside its region are rendered ones; the prose digit is not
    assert audit(new) == [(3, "prose 7")]
    # doc_tables leaves the region alone, so both renderers can own parts of one file
    assert render_markdown(new, root=tmp_path) == new
    md = tmp_path / "x.md"
    md.write_text(text)
    assert update_files({md: new}, check=True, root=tmp_path) == 1 and md.read_text() == text
    assert "(rendered)" in capsys.readouterr().out
    assert update_files({md: new}, check=False, root=tmp_path) == 1 and md.read_text() == new
    assert update_files({md: new}, check=True, root=tmp_path) == 0
