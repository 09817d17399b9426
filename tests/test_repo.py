"""The repo's own promises: every output path the README suggests is ignored by git (the VinDr licence forbids
publishing the images, and overlays are images), the README's make commands parse as written, and
`make help` names every variable the Makefile reads from its command line."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_make_lines() -> list[str]:
    """Every `make ...` line of the README's bash blocks (comments cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("make ")]


def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False).returncode == 0


def test_every_output_path_the_readme_suggests_is_ignored_by_git() -> None:
    outs = {m for line in readme_make_lines() for m in re.findall(r"\bOUT=(\S+)", line)}
    relative = sorted(o for o in outs if not o.startswith(("/", "<", "$")))
    assert "out/new" in relative, relative  # the predict-images example
    # what every target writes (Layout): the data, fold files, runs, reports, submissions
    written = ["data/demo/train/x.png", "folds/x.csv", "runs/x/yolo/fold0/weights.pt", "reports/x/index.html",
               "submissions/x.csv", "reports/index.html"]
    tracked = [p for p in [*(f"{o}/overlays/x.png" for o in relative), *written] if not ignored(p)]
    assert not tracked, f"not ignored by .gitignore: {tracked}"
    assert not ignored("submissions/README.md") and not ignored("folds/README.md")  # the folders' own notes stay


@pytest.mark.parametrize("line", readme_make_lines())
def test_readme_make_commands_parse_as_written(line: str, tmp_path: Path) -> None:
    """`make -n` of each README command: the target exists and make accepts its variables (quoting included)."""
    done = subprocess.run(["bash", "-c", f"{line} -n -o .venv/.installed"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert "no target" not in done.stderr and "No rule to make target" not in done.stderr, done.stderr
    assert "unterminated" not in done.stderr and "Syntax error" not in done.stderr, done.stderr


def test_make_help_names_every_command_line_variable() -> None:
    """A command-line variable: one with a ``?=`` default, or one read and never set in the Makefile."""
    makefile = (REPO / "Makefile").read_text()
    read = set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", makefile)) - {"MAKE", "MAKEFILE_LIST", "CURDIR"}
    set_inside = set(re.findall(r"^(?:export\s+)?([A-Z][A-Z0-9_]*)\s*(?::=|=|\+=)", makefile, flags=re.M))
    variables = (read - set_inside) | set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*\?=", makefile, flags=re.M))
    shown = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    missing = sorted(v for v in variables if not re.search(rf"\b{v}=", shown))
    assert not missing, f"make help does not name: {missing}"


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_make_passes_yaml_values_and_refuses_settings_as_make_variables() -> None:
    """SET='train_args={"mixup":0.1} epochs=3' reaches the adapter as written (the recipe quotes shell syntax);
    `epochs=2` as a make variable would be ignored by make, so it stops naming SET; an unknown PROFILE names
    the profiles."""
    shown = make("config", "MODEL=yolo", 'SET=train_args={"mixup":0.1} epochs=3', "-o", ".venv/.installed")
    assert shown.returncode == 0, shown.stderr
    assert "train_args: {mixup: 0.1}" in shown.stdout and "\nepochs: 3  #" in shown.stdout, shown.stdout
    habit = make("config", "MODEL=yolo", "epochs=2", "-o", ".venv/.installed")
    assert habit.returncode == 2 and 'epochs=2 is not a make variable: profile settings go in SET, e.g. SET="epochs=2"' \
        in habit.stderr, habit.stderr
    typo = make("config", "MODEL=yolo", "PROFILE=ful", "-o", ".venv/.installed")
    assert typo.returncode == 2 and "PROFILE: 'ful' is not a profile of yolo: demo, full (did you mean 'full'?)" \
        in typo.stderr, typo.stderr
