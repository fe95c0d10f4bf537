"""The checked-in API documents are what the code generates: a change to an event, a
topic, an error code or an HTTP body that is not followed by ``multimodal-engine docs``
fails here."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from consumers.apidocs import generated_documents
from consumers.cli import main
from tests.support.openapi_check import DOCS


@pytest.mark.parametrize("name", sorted(generated_documents()))
def test_the_checked_in_document_is_what_the_code_generates(name: str) -> None:
    generated = generated_documents()[name]
    path = DOCS / name
    checked_in = path.read_text("utf-8") if path.exists() else ""
    if checked_in != generated:
        diff = "".join(list(difflib.unified_diff(
            checked_in.splitlines(keepends=True), generated.splitlines(keepends=True),
            f"docs/{name} (checked in)", f"docs/{name} (from the code)"))[:60])
        pytest.fail(f"docs/{name} differs from what the code generates; run "
                    f"`multimodal-engine docs` (or `make docs`) and commit the result:\n{diff}",
                    pytrace=False)


def test_generating_twice_gives_the_same_text() -> None:
    assert generated_documents() == generated_documents()


def test_the_docs_command_writes_both_documents(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    main(["docs", str(tmp_path / "out")])
    expected = generated_documents()
    assert {p.name: p.read_text("utf-8") for p in (tmp_path / "out").iterdir()} == expected
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / n) for n in expected]
