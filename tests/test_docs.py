"""The Sphinx documentation builds offline with warnings as errors."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


# Sphinx's own deprecations (e.g. napoleon on Sphinx 9) are not ours; Sphinx warnings
# about the documents are still errors through -W.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::PendingDeprecationWarning"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build = pytest.importorskip("sphinx.cmd.build")
    out = tmp_path_factory.mktemp("docs")
    status = build.build_main(
        ["-W", "-q", "-b", "html", "-d", str(out / "doctrees"), str(DOCS), str(out / "html")])
    return status, out / "html"


def test_docs_build_without_warnings(built):
    status, folder = built
    assert status == 0
    assert (folder / "index.html").is_file()


def test_parameter_tables_in_the_built_docs_agree_with_the_step_spec(built):
    from roman_tweakreg import TweakRegStep
    from roman_tweakreg.parameters import PARAMETERS

    status, folder = built
    assert status == 0
    page = html.unescape(re.sub(r"<[^>]+>", "", (folder / "parameters.html").read_text()))
    rows = {}
    for name, default in re.findall(r"\n(\w+)\n(.+)\n", page):
        rows.setdefault(name, default)
    spec = TweakRegStep.load_spec_file()
    ours = [p for p in PARAMETERS if p.in_step]
    assert len(ours) == 43  # 41, abs_refcat_max_bytes (issue 28) and psf_model (issue 24)
    for p in ours:
        assert p.name in spec, p.name
        default = TweakRegStep().get_pars()[p.name]
        assert rows[p.name] == ("None" if default is None else repr(default)), p.name
    # the detection page lists DetectionParameters' own too
    page = html.unescape(re.sub(r"<[^>]+>", "", (folder / "detection.html").read_text()))
    for p in PARAMETERS:
        if p.section == "detection":
            assert f"\n{p.name}\n{'None' if p.default is None else repr(p.default)}\n" in page
