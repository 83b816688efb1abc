"""A regular (non-editable) install imports both packages under the one name `beamsift`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_imports_beamsift(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    assert not (target / "pipeline").exists() and not (target / "transforms").exists()
    # Every module of the source tree: a subpackage left out of pyproject's list would be missing.
    modules = [
        "beamsift." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for folder in ("pipeline", "transforms")
        for p in sorted((ROOT / folder).rglob("*.py"))
    ]
    code = (
        f"import importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "import beamsift.transforms.stages.dsir as m; print(m.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout
    assert out.strip().startswith(str(target))


FIRST_IMPORT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "beamsift" or m.startswith("beamsift.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed.append(f"{name}: {e}")
print("\\n".join(failed))
"""


def test_every_module_imports_as_the_first_beamsift_module_of_a_process():
    """A worker imports the module of whatever it unpickles first (a combine's class, a stage's
    DoFn), before any other of ours: no module may need another to have been imported before it
    (an import cycle that the driver's order hides failed only on a fresh worker)."""
    modules = sorted(
        "beamsift." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for folder in ("pipeline", "transforms")
        for p in (ROOT / folder).rglob("*.py")
    )
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT, *modules], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", done.stdout
