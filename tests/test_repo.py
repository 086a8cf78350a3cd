"""The repository's promises: the README's test command is what CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    fence = readme.index("```bash")
    commands = [l for l in readme[fence + 1 : readme.index("```", fence + 1)] if not l.startswith("#")]
    assert len(commands) == 2, "the README opens with exactly two set-up commands"
    assert "examples/quickstart.py" in commands[0]
    assert "pytest" in commands[1]
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()
