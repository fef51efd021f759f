"""The wheel installs one namespace, ling_surgery (never top-level surgery/cli/evals), with the recipes inside."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_contents_and_import(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    wheel = next(tmp_path.glob("ling_surgery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert all(t == "ling_surgery" or t.endswith(".dist-info") for t in top), top  # no top-level surgery/cli/evals
    assert "ling_surgery/surgery/kda.py" in names and "ling_surgery/cli/app.py" in names and "ling_surgery/evals/report.py" in names
    assert any(n.startswith("ling_surgery/recipes/") and n.endswith(".yaml") for n in names)
    assert not any(n.startswith(("ling_surgery/tests/", "ling_surgery/.ci")) for n in names)
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = ("import ling_surgery.cli, ling_surgery.surgery.kda, ling_surgery.evals.report, sys; print(ling_surgery.__file__); "
            "from ling_surgery.surgery.recipes import list_recipes, resolve_recipe; "
            "print(' '.join(r.name for r in list_recipes())); print(resolve_recipe('smollm2-135m-cpu'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(unpacked), "PATH": ""},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    package_file, names, demo = out.stdout.strip().splitlines()
    assert str(unpacked) in package_file
    assert {"smollm2-135m-cpu", "llama-3.1-8b-gpu", "smollm2-135m-all-mla", "ci-smoke"} <= set(names.split())
    assert demo.startswith(str(unpacked))  # found inside the installed package, not the source tree


def test_editable_install_is_the_package():
    import ling_surgery
    import ling_surgery.surgery

    assert Path(ling_surgery.surgery.__file__).parent.name == "surgery"
    assert "ling_surgery.surgery" == ling_surgery.surgery.__name__
