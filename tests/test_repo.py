"""The repo's own promises: every output path the README suggests is ignored by git (the VinDr licence forbids
publishing the images, and overlays are images), the README's make commands parse as written, and
`make help` names every variable the Makefile reads from its command line."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_make_lines() -> list[str]:
    """Every `make ...` command of the README's bash blocks (comments cut, backslash continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = [re.sub(r"\\\n\s*", "", block) for block in blocks]
    return [line.split("  #")[0].strip() for block in commands for line in block.splitlines()
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
    # -n goes right after `make`: appended to a line that ends in a backslash it would be an argument, and the
    # command would really run
    dry = line.replace("make ", "make -n -o .venv/.installed ", 1)
    done = subprocess.run(["bash", "-c", dry], cwd=REPO, capture_output=True, text=True,
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


def stand_in_nvidia_smi(folder: Path, rows: list[str]) -> dict:
    """An environment whose PATH starts with an `nvidia-smi` that prints ``rows`` (name, driver, compute cap)."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(rows) + "\nEOF\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize("rows, cuda, code, says", [
    (["NVIDIA H100 80GB HBM3, 580.82.07, 9.0"], None, 0, "the CUDA 13.0 build of torch runs here"),
    (["Tesla T4, 535.104.05, 7.5", "Tesla T4, 535.104.05, 7.5"], None, 2,
     "driver 535.104.05 is older than R580 (580.65.6), which the CUDA 13.0 build of torch needs: make install "
     "TORCH_CUDA=12.6"),
    (["Tesla T4, 535.104.05, 7.5"], "12.6", 0, "the CUDA 12.6 build of torch runs here"),
    (["Tesla P100-PCIE-16GB, 590.10.01, 6.0"], None, 2,
     "Tesla P100-PCIE-16GB (compute capability 6.0) is outside the CUDA 13.0 build's 7.5-12.0: make install TORCH_CUDA=12.6"),
    (["NVIDIA H100 80GB HBM3, 580.82.07, 9.0"], "11.8", 2, "error: TORCH_CUDA=11.8: one of 13.0, 12.6"),
    (["Tesla K80, 470.82.01, 3.7"], "12.6", 2, "older than R525 (525.60.13), which the CUDA 12.6 build of torch "
                                                "needs: make install a newer NVIDIA driver"),
])
def test_driver_check_with_a_stand_in_nvidia_smi(rows: list[str], cuda: str | None, code: int, says: str,
                                                 tmp_path: Path) -> None:
    env = stand_in_nvidia_smi(tmp_path / "bin", rows)
    done = subprocess.run(["python3", "tools/check_driver.py", *(["--cuda", cuda] if cuda else [])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == code and says in done.stdout + done.stderr, done.stdout + done.stderr
    if code:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, however many cards


def test_make_install_checks_the_driver_before_downloading_anything(tmp_path: Path) -> None:
    """An old driver stops `make install` at its first step (the stamp made stale with -W, so the recipe runs)."""
    env = stand_in_nvidia_smi(tmp_path / "bin", ["Tesla T4, 535.104.05, 7.5"])
    done = subprocess.run(["make", "install", "-W", "requirements.txt"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and "TORCH_CUDA=12.6" in done.stderr, done.stdout + done.stderr
    assert "pip" not in done.stdout, done.stdout  # nothing was installed
    dry = make("-n", "-W", "requirements.txt", "install", "TORCH_CUDA=12.6").stdout
    assert dry.index("check_driver.py --cuda 12.6") < dry.index("download.pytorch.org/whl/cu126") \
        < dry.index("-r requirements.txt"), dry


def test_readme_cost_estimates_are_the_scripts() -> None:
    """The README's estimate table is what bench/cost_estimate.py derives (for A100 and T4), so the sources it
    names and the figures shown cannot drift apart."""
    import sys
    rows = {}
    for card in ("A100", "T4"):
        out = subprocess.run([sys.executable, "bench/cost_estimate.py", "--card", card], cwd=REPO, capture_output=True,
                             text=True, timeout=120, check=True).stdout
        assert "ESTIMATES" in out
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[1] == "full":
                rows.setdefault(parts[0], []).append((float(parts[2]), float(parts[3])))
            if line.startswith("4 x 5 folds"):
                rows.setdefault("all", []).append((None, float(parts[4])))
    table = {line.split("|")[1].split()[0]: [c.strip() for c in line.split("|")[2:5]]
             for line in README.splitlines() if line.startswith(("| yolo full (", "| detectron full (", "| effdet full (",
                                                                  "| classifier full (", "| all four"))}
    for name, ((ips, a100), (_, t4)) in rows.items():
        shown = table["all" if name == "all" else name]
        assert shown[1:] == [f"{a100:.1f}", f"{t4:.1f}"], (name, shown)
        assert name == "all" or shown[0] == f"{ips:.1f}", (name, shown)


def test_readme_names_the_tensorboard_tags_the_curves_write() -> None:
    from models.curves import TAGS
    said = re.search(r"under the same tags for all models: (.*?)\), `train/`", README.replace("\n", " "), flags=re.S)
    assert said, "the README's fold-files paragraph names the TensorBoard tags"
    assert set(re.findall(r"`([^`]+)`", said.group(1))) == set(TAGS.values()), said.group(1)


def test_demo_runs_its_folds_through_the_scheduler_one_slot_per_core() -> None:
    slots = ",".join(str(i) for i in range(min(4, len(os.sched_getaffinity(0)))))  # nproc: the cores it may use
    plan = make("-n", "demo", "-o", ".venv/.installed", "-o", "demo-data").stdout
    assert f"pipeline evaluate DEVICES={slots}" in plan, plan
    chosen = make("-n", "demo", "DEVICE=cpu", "-o", ".venv/.installed", "-o", "demo-data").stdout
    assert "pipeline evaluate" in chosen and "DEVICES=" not in chosen, chosen  # the user's choice wins
