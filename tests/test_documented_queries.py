"""Every SQL query the README and the deployment guide show runs on the migrated schema: a view
column renamed by a migration, or a typo in the docs, fails here, not at a quality engineer's
desk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "deployment.md"]


def _queries() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```sql\n(.*?)```", doc.read_text(), re.S):
            lines = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
            for statement in " ".join(lines).split(";"):
                if statement.strip():
                    found.append((doc.name, " ".join(statement.split())))
    return found


QUERIES = _queries()


def test_the_docs_show_queries():
    assert len(QUERIES) >= 8, QUERIES


@pytest.mark.parametrize(("doc", "query"), QUERIES, ids=[q[:60] for _, q in QUERIES])
def test_a_documented_query_runs(migrated_url: str, doc: str, query: str) -> None:
    engine = create_engine(migrated_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SET TRANSACTION READ ONLY"))  # a query, not a change
            conn.execute(text(query)).all()
    finally:
        engine.dispose()
