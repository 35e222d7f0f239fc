"""The package as a user gets it: a wheel installed (not editable), used from a folder outside the checkout.

Nothing may depend on the checkout: no shipped pair may look for a model file inside the installed
package, and every hint must name a command that the install provides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chat_driver import ROOT

CHECK = """
import sys
from pathlib import Path
import dera_gguf
from dera_gguf.pairs.registry import PACKAGED, load_registry

package = Path(dera_gguf.__file__).parent
assert "site-packages" in str(package) and Path(sys.argv[1]) not in package.parents, package
registry = load_registry()
assert registry.files == [PACKAGED], registry.files
for pair in registry.pairs.values():
    for source in pair.sources():
        if source.kind == "path":
            assert package not in source.local_path().parents, (pair.name, source.local_path())
        hint = source.hint(pair)
        assert hint.startswith(("dera-pull ", "pip install ")) and "scripts/" not in hint, (pair.name, hint)
from dera_gguf.eval.judges import default_prompt  # the judge prompts ship in the package's data

assert "{answer}" in default_prompt("single") and "{answer_b}" in default_prompt("pairwise")
print("ok", package)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with dera-gguf's wheel (its dependencies from this environment)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that no stale build/ folder of the checkout goes into the wheel
    junk = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".gpu", "runs", "models"
    )
    shutil.copytree(ROOT, source, symlinks=True, ignore=junk)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(root.glob("dera_gguf-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    see_our_packages(venv)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    return venv


def see_our_packages(venv: Path) -> None:
    """Let ``venv`` import the packages this interpreter imports, after its own (the wheel first).

    ``--system-site-packages`` would show it the base interpreter's packages, not those of a
    virtual environment the tests run in; a ``.pth`` file naming this interpreter's package folders
    works however it was installed. Their own ``.pth`` files are not read, so an editable install of
    the checkout there stays invisible.
    """
    folders = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    check = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = subprocess.run([str(venv / "bin" / "python"), "-c", check], capture_output=True, text=True, check=True)
    (Path(own.stdout.strip()) / "_test_outer_packages.pth").write_text("\n".join(folders) + "\n")


def outside(tmp_path: Path) -> dict:
    """No PYTHONPATH to the checkout, an empty hub cache, a user model folder of the test's own."""
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", DERA_HOME=str(tmp_path / "home"))
    for key in ("PYTHONPATH", "DERA_MODELS"):
        env.pop(key, None)
    return env


def run_installed(installed: Path, tmp_path: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    """A command of the installed package, run from ``tmp_path`` (outside the checkout)."""
    return subprocess.run(
        [str(installed / "bin" / command), *args],
        cwd=tmp_path,
        env=outside(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_shipped_pair_needs_the_checkout_or_the_package_folder(installed, tmp_path):
    check = run_installed(installed, tmp_path, "python", "-c", CHECK, str(ROOT))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok ")


def test_the_main_command_works_from_another_folder(installed, tmp_path):
    """The README's main job after a plain install: the default pair is not pulled, the demo answers."""
    chat = run_installed(installed, tmp_path, "dera-chat", "--lam", "1.5", "--max-tokens", "8", "--prompt", "Hi!")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    assert "pair 'zephyr-7b' is not downloaded: get it with: dera-pull zephyr-7b (8.74 GB)" in chat.stderr
    assert "using the fallback pair 'smollm2-demo'" in chat.stderr
    for command in ("dera-pull", "dera-pairs", "dera-convert", "dera-eval", "dera-serve"):
        helped = run_installed(installed, tmp_path, command, "--help")
        assert helped.returncode == 0, (command, helped.stderr)
    listed = run_installed(installed, tmp_path, "dera-pairs")
    assert "site-packages/dera_gguf/models.toml" in listed.stdout and str(ROOT) not in listed.stdout


def test_dera_eval_harness_runs_from_the_installed_wheel(installed, tmp_path):
    """lm-evaluation-harness tasks over a λ sweep, the command of the installed package, outside the checkout."""
    from lm_eval_driver import TASKS, write_tasks
    from serve_driver import tiny_pair

    paths = tiny_pair(tmp_path)
    tasks = write_tasks(tmp_path / "tasks", {"t_mc": TASKS["t_mc"]})
    env_args = ["--ref", str(paths[0]), "--aligned", str(paths[1]), "--n-ctx", "512", "--tasks", "t_mc"]
    env_args += ["--include-path", str(tasks), "--lams", "0,1", "--out", str(tmp_path / "run")]
    done = run_installed(installed, tmp_path, "dera-eval", "harness", *env_args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best lam for t_mc by acc,none" in done.stdout
    assert (tmp_path / "run" / "summary.json").exists() and list((tmp_path / "run" / "lam-1").rglob("results_*.json"))


def test_dera_eval_generate_with_a_judge_runs_from_the_installed_wheel(installed, tmp_path):
    """A λ sweep graded by an LLM judge (a local OpenAI-compatible endpoint that grades every answer 7),
    the command of the installed package, outside the checkout."""
    import json

    from judge_driver import ScriptedJudge, completion
    from serve_driver import tiny_pair

    paths = tiny_pair(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello world", "the cat")))
    judge = ScriptedJudge(lambda prompt, n: (200, completion("Rating: 7")))
    try:
        args = ["generate", "--ref", str(paths[0]), "--aligned", str(paths[1]), "--n-ctx", "256"]
        args += ["--prompts", str(prompts), "--lams", "0,1", "--max-tokens", "6", "--out", str(tmp_path / "run")]
        args += ["--judge", "single", "--judge-url", judge.url, "--judge-model", "scripted", "--no-progress"]
        done = run_installed(installed, tmp_path, "dera-eval", *args)
    finally:
        judge.close()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(e["lam"], e["mean_rating"], e["judged"]) for e in summary] == [(0.0, 7.0, 2), (1.0, 7.0, 2)]
    assert len(judge.arrivals) == 4  # one question per answer
