"""The pure modules import neither ray nor mlflow (nor anything that does)."""
import subprocess
import sys

PURE = ["regft.losses", "regft.ensemble", "regft.zeroshot", "regft.metrics", "regft.prompts"]


def test_pure_modules_do_not_import_ray_or_mlflow():
    code = (
        "import sys\n"
        f"for m in {PURE!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'optuna'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure modules pulled in: {out.stdout}"


def test_check_detects_an_impure_import():
    """The check above can fail: importing ray shows up in sys.modules."""
    code = "import sys, ray\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
