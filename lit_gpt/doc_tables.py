"""Numbers in the markdown rendered from committed raw files: one mechanism for every table and every number in
prose of README.md, docs/*.md, scripts/*.md and benchmarks/README.md.

Raw files are small JSON or CSV files under ``docs/results/`` or ``benchmarks/results/`` (written by the drivers'
``--record``, see :mod:`lit_gpt.results`), or text files there (a run's log, pytest's output) read with
``grab``. The markdown names them in HTML comments, which GitHub does not show:

* a context, in force until the next one::

      <!-- results: docs/results/smollm2/sink.json act=docs/results/smollm2/activations.json
      let:
        nat: models['SmolLM2-135M-Instruct.Q4_1'].natural
      -->

  binds the first file's top-level keys as names, every file under its alias (``act=``; default: the file
  stem, non-identifier characters as ``_``), and each ``let`` name to an expression over those (in order);

* a table, regenerated between its two comments (a path after ``table:`` gives the table its own context)::

      <!-- table: docs/results/smollm2/sink.json
      header: [input, Sink_1]
      rows:
        - for: k in ['natural', 'random']
          row: ["{k}", "{models['SmolLM2-135M-Instruct.Q4_1'][k].sink.sink_1:.2f}"]
        - ["total", "{len(models)}"]
      -->
      | input | Sink_1 |
      ...
      <!-- /table -->

* a value inside a sentence: ``<!-- v: {nat.sink.sink_1:.2f} -->70.29<!-- /v -->``; for a value shown as code
  the backticks go inside the template (``<!-- v: `{cmd}` -->`...`<!-- /v -->``): a marker inside an inline
  code span is an error (GitHub would show the comment, and the value would never be rendered), unless its
  template has no field (the syntax written as an example);

* a region that a dedicated renderer fills (``scripts/repro_tables.py``, kind ``repro``: tables whose rows, rules
  and plots come from a registry rather than from one marker), between ``<!-- KIND:NAME:begin -->`` and
  ``<!-- KIND:NAME:end -->``; :func:`splice_region` writes it, :func:`update_files` writes or checks the files of
  either renderer, and ``--audit`` treats the region as rendered.

Templates are text with ``{expression}`` or ``{expression:format}`` fields (Python format specs; ``{{`` and
``}}`` for literal braces). Expressions are Python expressions without builtins, over the names above and the
helpers in :data:`HELPERS`; JSON objects allow ``a.b`` as well as ``a['b']``; CSV files are lists of rows with
numbers converted.

    python -m lit_gpt.doc_tables            # re-render every default markdown file in place
    python -m lit_gpt.doc_tables --check    # exit 1 and show what differs (what tests/test_doc_tables.py does)
    python -m lit_gpt.doc_tables --audit    # list digits in prose that no comment renders (to find unbacked numbers)
"""
from __future__ import annotations

import csv
import difflib
import json
import math
import re
import statistics
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from lit_gpt.utils import ArgumentParser, did_you_mean, invalid_choice

ROOT = Path(__file__).resolve().parents[1]
RAW_DIRS = ("docs/results", "benchmarks/results")
DEFAULT_FILES = ("README.md", "docs/*.md", "scripts/*.md", "benchmarks/README.md")
MAX_RAW_BYTES = 512 * 1024
RAW_SUFFIXES = (".json", ".csv", ".txt", ".log")     # text files (logs, pytest output) are read as one string

_OPEN = re.compile(r"<!--\s*(results|table):(.*?)-->", re.S)
_VALUE = re.compile(r"<!--\s*v:(.*?)-->(.*?)<!--\s*/v\s*-->", re.S)
_TABLE_END = re.compile(r"<!--\s*/table\s*-->")
_REGION = re.compile(r"<!--\s*(\w+):([\w.:-]+):begin\s*-->(.*?)<!--\s*\1:\2:end\s*-->", re.S)


class DocTableError(ValueError):
    """A marker that cannot be rendered: the message names the file, the line and the reason."""


# ---------------------------------------------------------------------------- raw data
class Obj(dict):
    """A JSON object whose keys also read as attributes (``row.sink_1``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no key {name!r}{did_you_mean(name, self)} (keys: "
                                 f"{', '.join(map(str, list(self)[:12]))})") from None


def _wrap(x: Any) -> Any:
    if isinstance(x, dict):
        return Obj((k, _wrap(v)) for k, v in x.items())
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _number(s: str) -> Any:
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def raw_path(spec: str, root: Path = ROOT) -> Path:
    """A raw file named in a marker: relative to the repository root, under one of :data:`RAW_DIRS`."""
    rel = Path(spec)
    if rel.is_absolute() or ".." in rel.parts or not any(rel.as_posix().startswith(d + "/") for d in RAW_DIRS):
        raise DocTableError(invalid_choice("raw file", spec, f"a path under {' or '.join(RAW_DIRS)}"))
    if rel.suffix not in RAW_SUFFIXES:
        raise DocTableError(invalid_choice("raw file", spec, f"{', '.join(RAW_SUFFIXES)} files"))
    return root / rel


@lru_cache(maxsize=256)
def _load_cached(path: str, mtime: float) -> Any:
    p = Path(path)
    if p.suffix == ".csv":
        with p.open(newline="") as f:
            return [Obj((k, _number(v)) for k, v in row.items()) for row in csv.DictReader(f)]
    if p.suffix in (".txt", ".log"):
        return p.read_text()
    return _wrap(json.loads(p.read_text()))


def load_raw(spec: str, root: Path = ROOT) -> Any:
    p = raw_path(spec, root)
    if not p.is_file():
        raise DocTableError(f"raw file {spec!r} does not exist")
    return _load_cached(str(p), p.stat().st_mtime)


# ---------------------------------------------------------------------------- helpers for expressions
def binmean(bins: Dict[str, Any], lo: int, hi: int) -> float:
    """Mean of the values in targets [lo, hi) from per-bin sums and counts (``{"width", "sum", "count"}``, the
    form eval_long_ppl.py records); lo must fall on a bin edge and hi too, unless hi lies in the last bin (then
    the mean runs to the end of the stream)."""
    w = int(bins["width"])
    if lo % w or (hi % w and hi < w * (len(bins["sum"]) - 1)):
        raise ValueError(f"binmean({lo}, {hi}): not on the bin edges (width {w})")
    a, b = lo // w, min(-(-hi // w), len(bins["sum"]))
    n = sum(bins["count"][a:b])
    return sum(bins["sum"][a:b]) / n if n else math.nan


def duration(seconds: float) -> str:
    """``348`` -> ``5 min 48 s`` (whole seconds; under a minute: ``42 s``)."""
    s = int(round(seconds))
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def mib(n_bytes: float) -> float:
    return n_bytes / 2 ** 20


def argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def argmin(xs: Sequence[float]) -> int:
    return min(range(len(xs)), key=lambda i: xs[i])


def where(rows: Iterable[Any], **match: Any) -> Any:
    """The single row of ``rows`` whose fields equal ``match`` (an error if none or several)."""
    got = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(got) != 1:
        raise ValueError(f"where({match}): {len(got)} rows match, expected 1")
    return got[0]


def grab_all(text: str, pattern: str) -> List[Any]:
    """Every match of ``pattern``'s first group in a text file (a log), as numbers where they parse ("1,234"
    reads 1234)."""
    return [_number(m.group(1).replace(",", "")) for m in re.finditer(pattern, text)]


def grab(text: str, pattern: str) -> Any:
    """The first match of ``pattern``'s first group (see :func:`grab_all`); an error when nothing matches."""
    found = grab_all(text, pattern)
    if not found:
        raise ValueError(f"no match for {pattern!r}")
    return found[0]


HELPERS: Dict[str, Any] = {
    "abs": abs, "all": all, "any": any, "dict": dict, "enumerate": enumerate, "float": float, "format": format,
    "int": int, "len": len, "next": next, "set": set, "tuple": tuple,
    "list": list, "max": max, "min": min, "range": range, "round": round, "sorted": sorted, "str": str, "sum": sum,
    "zip": zip, "mean": statistics.fmean, "median": statistics.median, "math": math, "argmax": argmax,
    "argmin": argmin, "binmean": binmean, "duration": duration, "mib": mib, "where": where, "grab": grab,
    "grab_all": grab_all,
}


def evaluate(expr: str, names: Dict[str, Any]) -> Any:
    # one globals mapping, so names resolve inside comprehensions too
    return eval(compile(expr.strip(), "<doc expression>", "eval"), {**HELPERS, **names, "__builtins__": {}})


# ---------------------------------------------------------------------------- templates
def _unquoted(s: str, start: int = 0):
    """(index, char, bracket depth) of every character of s[start:] outside string quotes."""
    depth, quote = 0, None
    for k in range(start, len(s)):
        d = s[k]
        if quote:
            quote = None if d == quote else quote
            continue
        if d in "'\"":
            quote = d
            continue
        if d in ")]}":
            depth -= 1
        yield k, d, depth + (d in ")]}")
        if d in "([{":
            depth += 1


def _fields(template: str) -> List[Tuple[bool, str]]:
    """Split a template into (is_field, text) parts; a field's text is ``expr`` or ``expr:format``."""
    out, i, buf = [], 0, []
    while i < len(template):
        c = template[i]
        if c in "{}" and template[i:i + 2] in ("{{", "}}"):
            buf.append(c)
            i += 2
            continue
        if c == "}":
            raise DocTableError(f"single '}}' in template {template!r} (write '}}}}' for a literal brace)")
        if c != "{":
            buf.append(c)
            i += 1
            continue
        j = next((k for k, d, depth in _unquoted(template, i + 1) if d == "}" and depth == 0), None)
        if j is None:
            raise DocTableError(f"unclosed '{{' in template {template!r}")
        if buf:
            out.append((False, "".join(buf)))
            buf = []
        out.append((True, template[i + 1:j]))
        i = j + 1
    if buf:
        out.append((False, "".join(buf)))
    return out


def _split_format(field: str) -> Tuple[str, str]:
    """'expr:format' at the last ':' outside brackets and quotes (slices and dict literals stay in expr)."""
    cut = max((k for k, d, depth in _unquoted(field) if d == ":" and depth == 0), default=-1)
    return (field, "") if cut < 0 else (field[:cut], field[cut + 1:])


def render_template(template: str, names: Dict[str, Any]) -> str:
    parts = []
    for is_field, text in _fields(str(template)):
        if not is_field:
            parts.append(text)
            continue
        expr, fmt = _split_format(text)
        try:
            value = evaluate(expr, names)
            parts.append(format(value, fmt))
        except DocTableError:
            raise
        except Exception as e:
            raise DocTableError(f"{{{text}}}: {type(e).__name__}: {e}") from None
    return "".join(parts)


# ---------------------------------------------------------------------------- contexts and tables
def _header_and_spec(body: str) -> Tuple[str, Dict[str, Any]]:
    """'PATHS\\nYAML' -> (PATHS, YAML mapping)."""
    first, _, rest = body.partition("\n")
    spec = yaml.safe_load(rest) if rest.strip() else {}
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise DocTableError("the lines after the first of a marker must be a YAML mapping")
    return first.strip(), spec


def make_context(paths: str, spec: Dict[str, Any], root: Path = ROOT,
                 inherit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    names: Dict[str, Any] = dict(inherit or {})
    for n, item in enumerate(paths.split()):
        alias, _, path = item.rpartition("=")
        data = load_raw(path, root)
        if n == 0 and isinstance(data, dict):
            names.update(data)
        alias = alias or re.sub(r"\W", "_", Path(path).stem)
        names[alias] = data
    for key, expr in (spec.get("let") or {}).items():
        try:
            names[key] = evaluate(str(expr), names)
        except Exception as e:
            raise DocTableError(f"let {key}: {type(e).__name__}: {e}") from None
    unknown = set(spec) - {"let", "header", "rows"}
    if unknown:
        raise DocTableError(f"unknown marker keys {sorted(unknown)}; allowed: let, header, rows")
    return names


def render_table(spec: Dict[str, Any], names: Dict[str, Any]) -> str:
    header = spec.get("header")
    rows = spec.get("rows")
    if not isinstance(header, list) or not isinstance(rows, list):
        raise DocTableError("a table needs 'header: [...]' and 'rows: [...]'")
    lines = ["| " + " | ".join(render_template(h, names) for h in header) + " |", "|" + "---|" * len(header)]
    for entry in rows:
        if isinstance(entry, dict):
            loop = re.fullmatch(r"\s*(\w+(?:\s*,\s*\w+)*)\s+in\s+(.+)", str(entry.get("for", "")), re.S)
            if not loop or "row" not in entry:
                raise DocTableError(f"row {entry!r}: a loop row is {{for: NAME in EXPR, row: [...]}}")
            targets = [t.strip() for t in loop.group(1).split(",")]
            for item in evaluate(loop.group(2), names):
                local = dict(names)
                if len(targets) == 1:
                    local[targets[0]] = item
                else:
                    local.update(zip(targets, item))
                lines.append(_row(entry["row"], header, local))
        else:
            lines.append(_row(entry, header, names))
    return "\n".join(lines)


def _row(cells: Any, header: list, names: Dict[str, Any]) -> str:
    if not isinstance(cells, list) or len(cells) != len(header):
        raise DocTableError(f"row {cells!r} must be a list of {len(header)} cells (one per header)")
    return "| " + " | ".join(render_template(c, names) for c in cells) + " |"


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


_FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", re.S | re.M)


_INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)[^\n]+?(?<!`)\1(?!`)")          # n backticks to the next n, on one line


def _code_spans(text: str) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """(start, end) of the fenced code blocks and of the inline code spans outside them."""
    fences = [(f.start(), f.end()) for f in _FENCE.finditer(text)]
    inline = [(c.start(), c.end()) for c in _INLINE_CODE.finditer(text)
              if not any(a <= c.start() < b for a, b in fences)]
    return fences, inline


def _inside(spans: List[Tuple[int, int]], pos: int) -> bool:
    return any(a <= pos < b for a, b in spans)


def _unfenced(pattern: re.Pattern, text: str, pos: int, end: Optional[int] = None):
    """Matches of ``pattern`` in text[pos:end] outside code blocks and inline code (examples stay examples)."""
    fences, inline = _code_spans(text)
    end = len(text) if end is None else end
    for m in pattern.finditer(text, pos, end):
        if not _inside(fences + inline, m.start()):
            yield m


def render_markdown(text: str, name: str = "<markdown>", root: Path = ROOT) -> str:
    """The text with every table and value re-rendered from its raw files (fenced code blocks left alone)."""
    out: List[str] = []
    names: Dict[str, Any] = {}
    pos = 0
    while True:
        m = next(_unfenced(_OPEN, text, pos), None)
        chunk_end = m.start() if m else len(text)
        out.append(_values(text, pos, chunk_end, names, name))
        if not m:
            return "".join(out)
        where_ = f"{name}:{_line(text, m.start())}"
        try:
            paths, spec = _header_and_spec(m.group(2))
            if m.group(1) == "results":
                names = make_context(paths, spec, root)
                out.append(m.group(0))
                pos = m.end()
                continue
            local = make_context(paths, spec, root) if paths else make_context("", spec, root, inherit=names)
            end = _TABLE_END.search(text, m.end())
            if not end:
                raise DocTableError("table without its closing <!-- /table -->")
            out.append(m.group(0) + "\n" + render_table(spec, local) + "\n" + end.group(0))
            pos = end.end()
        except DocTableError as e:
            raise DocTableError(f"{where_}: {e}") from None
        except yaml.YAMLError as e:
            raise DocTableError(f"{where_}: the marker's YAML does not parse: {e}") from None


def _values(text: str, start: int, end: int, names: Dict[str, Any], name: str) -> str:
    out, pos = [], start
    fences, inline = _code_spans(text)
    for m in _VALUE.finditer(text, start, end):
        if _inside(fences, m.start()):
            continue
        if _inside(inline, m.start()):
            try:
                example = not any(is_field for is_field, _ in _fields(m.group(1).strip()))
            except DocTableError:
                example = False     # braces that do not parse: meant as fields all the same
            if example:             # no field: the syntax shown as code (`<!-- v: TEMPLATE -->…<!-- /v -->`)
                continue
            raise DocTableError(f"{name}:{_line(text, m.start())}: a value marker inside an inline code span (a "
                                "backtick before it) is never rendered: put the backticks inside the template, "
                                "<!-- v: `{...}` -->`...`<!-- /v -->")
        out.append(text[pos:m.start()])
        try:
            rendered = render_template(m.group(1).strip(), names)
        except DocTableError as e:
            raise DocTableError(f"{name}:{_line(text, m.start())}: {e}") from None
        out.append(text[m.start():m.start(2)] + rendered + text[m.end(2):m.end()])
        pos = m.end()
    out.append(text[pos:end])
    return "".join(out)


# ---------------------------------------------------------------------------- regions of other renderers
def region_markers(kind: str, name: str) -> Tuple[str, str]:
    """The comments that open and close region ``name`` of renderer ``kind``."""
    return f"<!-- {kind}:{name}:begin -->", f"<!-- {kind}:{name}:end -->"


def splice_region(text: str, kind: str, name: str, body: str, heading: str = "") -> str:
    """The text with the region's content replaced by ``body``; a region not there yet is appended at the end
    (under ``heading`` when one is given)."""
    b, e = region_markers(kind, name)
    block = f"{b}\n{body}\n{e}"
    if b in text and e in text:
        i, j = text.index(b), text.index(e) + len(e)
        return text[:i] + block + text[j:]
    return text.rstrip("\n") + (f"\n\n{heading}" if heading else "") + f"\n\n{block}\n"


def update_files(texts: Dict[Path, str], check: bool, root: Path = ROOT) -> int:
    """Write every file whose text differs from ``texts`` (atomically), or with ``check`` write nothing and show
    what differs; returns the number of files that differed (one mechanism for doc_tables and repro_tables)."""
    from lit_gpt.utils import atomic_write_text

    differ = 0
    for path, new in texts.items():
        old = path.read_text() if path.is_file() else ""
        if new == old:
            continue
        differ += 1
        rel = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
        if check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{rel} (now)",
                                                       f"{rel} (rendered)"))
        else:
            atomic_write_text(path, new)
            print(f"rendered {rel}")
    return differ


def markdown_files(root: Path = ROOT, patterns: Sequence[str] = DEFAULT_FILES) -> List[Path]:
    files: List[Path] = []
    for pat in patterns:
        files += sorted(root.glob(pat))
    return files


def raw_files_used(text: str, root: Path = ROOT) -> List[Path]:
    """Every raw file a markdown text names in its markers."""
    found = []
    for m in _unfenced(_OPEN, text, 0):
        paths, _ = _header_and_spec(m.group(2))
        for item in paths.split():
            found.append(raw_path(item.rpartition("=")[2], root))
    return found


# ---------------------------------------------------------------------------- audit: digits nobody renders
_SKIP = re.compile(r"```.*?```|`[^`\n]*`|<!--.*?-->|\]\([^)]*\)|<[^>\n]+>", re.S)


def audit(text: str) -> List[Tuple[int, str]]:
    """(line, text) of prose lines holding digits outside code, comments, links and rendered regions, so a
    writer can see which numbers are not backed by a raw file yet (numbers of the setup, such as ε = 0.3 or a
    layer count, are expected there)."""
    blank = [(m.start(3), m.end(3)) for m in _REGION.finditer(text)]
    for m in _VALUE.finditer(text):
        blank.append((m.start(2), m.end(2)))
    for m in _OPEN.finditer(text):
        if m.group(1) == "table":
            end = _TABLE_END.search(text, m.end())
            if end:
                blank.append((m.end(), end.start()))
    chars = list(text)
    for a, b in blank:
        for i in range(a, b):
            if chars[i] != "\n":
                chars[i] = " "
    masked = _SKIP.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "".join(chars))
    return [(i + 1, line.strip()) for i, line in enumerate(masked.splitlines()) if re.search(r"\d", line)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help=f"markdown files (default: {' '.join(DEFAULT_FILES)})")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file differs")
    mode.add_argument("--audit", action="store_true", help="list prose lines with digits that nothing renders")
    args = ap.parse_args(argv)
    files = [Path(f) for f in args.files] or markdown_files()
    errors = 0
    texts: Dict[Path, str] = {}
    for f in files:
        text = f.read_text()
        rel = f.resolve().relative_to(ROOT) if f.resolve().is_relative_to(ROOT) else f
        if args.audit:
            for line, s in audit(text):
                print(f"{rel}:{line}: {s}")
            continue
        try:
            texts[f] = render_markdown(text, str(rel))
        except DocTableError as e:
            print(f"error: {e}", file=sys.stderr)
            errors += 1
    differ = update_files(texts, args.check)
    return 1 if errors or (args.check and differ) else 0


if __name__ == "__main__":
    sys.exit(main())
