"""The Sphinx documentation builds offline with warnings as errors."""

from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


# Sphinx's own deprecations (e.g. napoleon on Sphinx 9) are not ours; Sphinx warnings
# about the documents are still errors through -W.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_docs_build_without_warnings(tmp_path):
    build = pytest.importorskip("sphinx.cmd.build")
    status = build.build_main(
        ["-W", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
         str(tmp_path / "html")])
    assert status == 0
    assert (tmp_path / "html" / "index.html").is_file()
