"""The registry reads the newest migration revision from the files as text, so a restart on a
database already at head skips importing alembic; alembic's own answer is the oracle."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory

from services.registry import db


def test_schema_head_read_as_text_is_alembics_head() -> None:
    script = ScriptDirectory.from_config(db.alembic_config("postgresql://u@localhost/d"))
    assert db.schema_head() == script.get_current_head()


def _migration(directory: Path, name: str, revision: str, down: str) -> None:
    (directory / f"{name}.py").write_text(
        f'revision: str = "{revision}"\ndown_revision: str | None = {down}\n'
    )


def test_a_branch_a_merge_or_an_unreadable_file_leaves_the_decision_to_alembic(tmp_path: Path) -> None:
    _migration(tmp_path, "a", "0001", "None")
    _migration(tmp_path, "b", "0002", '"0001"')
    assert db.schema_head(tmp_path) == "0002"
    _migration(tmp_path, "c", "0003", '"0001"')  # two heads
    assert db.schema_head(tmp_path) is None
    (tmp_path / "c.py").write_text('revision = "0003"\ndown_revision = ("0001", "0002")\n')  # a merge
    assert db.schema_head(tmp_path) is None
    (tmp_path / "c.py").write_text("# no revision here\n")
    assert db.schema_head(tmp_path) is None
