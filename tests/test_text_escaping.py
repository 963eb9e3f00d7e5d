"""Text from files never reaches a terminal or a page raw: `markdown.printable` shows every control character as a
visible escape, every line the command line prints passes through it (the error line, log and progress lines, and a
guard on stdout and stderr), and every Markdown, HTML and LaTeX cell of a report is escaped."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from medistill.markdown import PrintableStream, cell, printable, unguarded
from medistill.study.analysis import Cell, Correlation, correlation_markdown, latex_table, markdown_tables
from medistill.study.predict import HeldOut
from medistill.study.report import _md_table_html, held_out_markdown, lodo_markdown

NAME = "a\nb\x1b[31m|x"  # a newline, a terminal escape sequence (red) and a table border
CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # all but the newline


def raw_controls(text: str) -> list[str]:
    return sorted({hex(ord(c)) for c in CONTROLS.findall(text)})


def test_printable_escapes_every_control_character_and_keeps_the_rest() -> None:
    assert printable("a\nb\x1b[31m.png") == "a\\nb\\x1b[31m.png"
    assert printable("\t\r\x00\x7f\x85\x9b\u2028\u202e\u2066") == "\\t\\r\\x00\\x7f\\x85\\x9b\\u2028\\u202e\\u2066"
    kept = "plain spaces  stay, as do é, ±, – and 🙂"
    assert printable(kept) == kept
    everything = "".join(map(chr, range(0x2100)))
    assert not raw_controls(printable(everything)) and "\n" not in printable(everything)


def test_a_markdown_cell_is_one_line_with_controls_and_markup_escaped() -> None:
    text = cell(NAME + " <img src=x> [link](y) `code`")
    assert "\n" not in text and not raw_controls(text)
    assert re.search(r"(?<!\\)[|<>\[\]`]", text) is None
    assert cell("  spaced   out  ") == "spaced out"


def test_the_stream_guard_passes_newlines_and_escapes_the_rest() -> None:
    out = io.StringIO()
    guard = PrintableStream(out)
    guard.write(f"{NAME}\r\nnext line\n")
    assert out.getvalue() == "a\nb\\x1b[31m|x\\r\nnext line\n"
    assert not guard.isatty() and unguarded(guard) is out and unguarded(out) is out
    assert not hasattr(guard, "buffer")  # nothing can write around it in bytes


def test_the_error_line_and_log_lines_are_one_escaped_line(tmp_path, monkeypatch, capsys) -> None:
    from medistill.cli import main, say, tell

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["medistill", "distill", NAME, "-m", "random", "--out", "o"])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and "a\\nb\\x1b[31m|x" in lines[0]
    assert not raw_controls(out + err)
    assert sys.stdout is not None and not isinstance(sys.stdout, PrintableStream)  # the guard is removed again
    say(NAME)
    tell(NAME)
    out, err = capsys.readouterr()
    assert err == out == "a\\nb\\x1b[31m|x\n"


def test_progress_lines_are_escaped(capsys, monkeypatch) -> None:
    from medistill.progress import progress_bar

    monkeypatch.setenv("MEDISTILL_PROGRESS_SECONDS", "0")
    with progress_bar(2, NAME) as bar:
        bar.advance(1, name=NAME)
        bar.advance(1)
    err = capsys.readouterr().err
    assert err.count("\n") == len(err.strip().splitlines()) and not raw_controls(err)
    assert "a\\nb\\x1b[31m|x" in err


def test_study_tables_keep_their_cells_whatever_the_names() -> None:
    cells = [
        Cell(NAME, "random", 1, acc=[0.5], auc=[0.5], keys=["k)1 <b>"], seeds=[0]),
        Cell(NAME, "dm", 1, acc=[0.6], auc=[0.6], keys=["k2"], seeds=[0]),
    ]
    rows = [
        HeldOut(predictor, NAME, NAME, True, 1, 0.5, 0.6, 0.55, 0.4, 0.7, NAME, [NAME])
        for predictor in ("transfer", "line")
    ]
    pages = [
        markdown_tables(cells, "acc", "runs/"),
        held_out_markdown(rows),
        lodo_markdown(rows),
        correlation_markdown({NAME: Correlation(NAME, 2, 2)}),
    ]
    for page in pages:
        assert not raw_controls(page)
        table = [line for line in page.splitlines() if line.startswith("|")]
        counts = {len(re.split(r"(?<!\\)\|", line)) for line in table}
        assert len(counts) == 1, table  # no name added a cell or a line
        html = _md_table_html(page)
        assert not raw_controls(html) and "<img" not in html and "<b>" not in html
    assert "(runs/k%291%20%3Cb%3E.json)" in pages[0]  # a run key cannot end the link or add markup
    tex = latex_table(cells, "acc")
    assert not raw_controls(tex) and "\\x1b" not in tex.replace("\\textbackslash{}x1b", "")


@pytest.mark.parametrize("special", ["\\input{/etc/passwd}", "50% & $x^2$ #1 ~ {}"])
def test_latex_cells_escape_what_latex_interprets(special) -> None:
    tex = latex_table([Cell(special, "random", 1, acc=[0.5], auc=[0.5], keys=["k"], seeds=[0])], "acc")
    line = next(line for line in tex.splitlines() if "multicolumn" in line)
    name = line.split("{c}{", 1)[1].rsplit("}", 1)[0]
    assert re.search(r"(?<!\\)[&%$#^~]", name.replace("\\textasciicircum{}", "").replace("\\textasciitilde{}", "")) is None
    assert "\\input" not in name


def test_report_pages_of_a_study_hold_no_raw_control_characters(tmp_path: Path) -> None:
    from medistill.study.report import report_html, report_markdown

    study = {"name": NAME, "config_path": f"/x/{NAME}.yaml", "runs": ["k1"]}
    failed = {"key": "k1\n)", "status": "failed", "dataset_label": NAME, "host": NAME,
              "spec": {"method": NAME, "ipc": "<i>", "seed": 0}, "error": {"type": NAME, "message": NAME}}
    from medistill.study.report import ProbeComparison

    comparison = ProbeComparison({}, [], {}, [])
    for page in (
        report_markdown(study, [failed], [], {}, [], comparison, [], [(NAME, f"runs/{NAME}/grid.png")]),
        report_html(study, [failed], [], {}, [], comparison, [], [(NAME, f"runs/{NAME}/grid.png")]),
    ):
        assert not raw_controls(page)
        assert "<i>" not in page and "k1\n)" not in page
