"""The build record: show_config()/build_info(), and the torch check that runs on import before
the compiled extension is loaded. Also run against the installed wheel (.ci/install_check.sh),
where it asserts that the installed copy, not a source tree, is the one imported."""

import glob
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import selattn_ext
from selattn_ext import _config

PACKAGE_DIR = os.path.dirname(os.path.abspath(selattn_ext.__file__))


def run_python(code, pythonpath, cwd):
    """Runs ``code`` in a fresh interpreter whose first import path is ``pythonpath``; returns
    (returncode, stdout + stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pythonpath, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_build_info_describes_this_build():
    info = selattn_ext.build_info()
    assert info["version"] == selattn_ext.__version__
    assert info["torch_version"] == str(torch.__version__)  # else the import would have failed
    assert info["cpu_isa"] in ("AVX2", "none")
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        archs = info["cuda_archs"]
        assert any(a.startswith("sm_") for a in archs), archs
        assert any(a.startswith("compute_") for a in archs), archs  # PTX for newer GPUs
        assert info["cuda_toolkit_version"]
    else:
        assert info["cuda_archs"] == [] and info["cuda_toolkit_version"] is None
    info["version"] = "changed"
    assert selattn_ext.build_info()["version"] == selattn_ext.__version__, "must return a copy"


def test_build_record_sits_next_to_the_extension():
    assert glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")) or glob.glob(os.path.join(PACKAGE_DIR, "_C*.pyd"))
    assert os.path.exists(os.path.join(PACKAGE_DIR, "_build_info.py"))


def test_show_config_prints_the_build():
    buf = io.StringIO()
    assert selattn_ext.show_config(file=buf) is None
    text = buf.getvalue()
    info = selattn_ext.build_info()
    assert f"selattn_ext {selattn_ext.__version__}" in text
    assert f"built against torch:     {info['torch_version']}" in text
    assert f"running torch:           {torch.__version__}" in text
    assert f"CPU kernel ISA:          {info['cpu_isa']}" in text
    assert ("CUDA kernels:            yes" if info["with_cuda"] else
            "CUDA kernels:            no (CPU-only build)") in text


def test_show_config_lists_cuda_toolkit_and_archs():
    info = dict(selattn_ext.build_info(), with_cuda=True, cuda_toolkit_version="13.0.48",
                torch_cuda_version="13.0", cuda_archs=["sm_80", "sm_90", "compute_90"])
    text = _config._format(info)
    assert "CUDA kernels:            yes" in text
    assert "CUDA toolkit:            13.0.48 (torch's CUDA 13.0)" in text
    assert "CUDA archs:              sm_80 sm_90; PTX compute_90" in text


def test_show_config_without_a_record_says_unknown(monkeypatch):
    monkeypatch.setattr(_config, "_recorded", lambda: None)
    buf = io.StringIO()
    selattn_ext.show_config(file=buf)
    assert "built against torch:     unknown" in buf.getvalue()
    assert selattn_ext.build_info()["version"] == selattn_ext.__version__


def test_check_build_accepts_the_build_torch():
    _config.check_build({"torch_version": "2.14.1+cu130"}, torch_version="2.14.1+cu130")


@pytest.mark.parametrize("built,running", [("2.13.0", "2.14.1"), ("2.14.1+cu130", "2.14.1+cpu"),
                                           (None, "2.14.1")])
def test_check_build_rejects_another_torch(built, running):
    with pytest.raises(ImportError, match="Rebuild selattn_ext") as err:
        _config.check_build({"torch_version": built}, torch_version=running)
    assert f"built against torch {built}, but torch {running} is imported" in str(err.value)


def test_import_with_another_torch_fails_before_loading_the_extension(tmp_path):
    # The recorded torch is faked; the real _C stays on disk but must never be loaded.
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('selattn_ext._build_info')\n"
        "fake.BUILD_INFO = {'torch_version': '1.0.0+fake'}\n"
        "sys.modules['selattn_ext._build_info'] = fake\n"
        "try:\n"
        "    import selattn_ext\n"
        "except ImportError as e:\n"
        "    assert 'built against torch 1.0.0+fake' in str(e) and 'Rebuild' in str(e), e\n"
        "    assert 'selattn_ext._C' not in sys.modules, 'the extension was loaded'\n"
        "    print('clear ImportError')\n"
        "else:\n"
        "    raise SystemExit('imported despite the torch mismatch')\n")
    rc, out = run_python(code, os.path.dirname(PACKAGE_DIR), str(tmp_path))
    assert rc == 0 and "clear ImportError" in out, out


def test_import_of_an_unbuilt_copy_says_build_it(tmp_path):
    # The package's Python files without _C (a checkout nobody has built).
    shutil.copytree(PACKAGE_DIR, tmp_path / "selattn_ext",
                    ignore=shutil.ignore_patterns("_C*", "_build_info.py", "__pycache__"))
    # An editable install's import finder would resolve the copy's missing _C to the
    # checkout's, so it is dropped; PYTHONPATH then finds only the copy.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "try:\n"
        "    import selattn_ext\n"
        "except ImportError as e:\n"
        "    assert 'never built' in str(e) and 'pip install' in str(e), e\n"
        "    print('clear ImportError')\n"
        "else:\n"
        "    raise SystemExit('imported without _C')\n")
    rc, out = run_python(code, str(tmp_path), str(tmp_path))
    assert rc == 0 and "clear ImportError" in out, out


def test_installed_copy_is_the_one_imported():
    """Only under .ci/install_check.sh, which names the fresh venv's site-packages."""
    expected = os.environ.get("SELATTN_EXPECT_INSTALLED_IN")
    if not expected:
        pytest.skip("not an installed-wheel run (SELATTN_EXPECT_INSTALLED_IN unset)")
    here = os.path.realpath(selattn_ext.__file__)
    assert here.startswith(os.path.realpath(expected) + os.sep), (here, expected)
    import selattn_ext.integrations.transformers as hf  # a subpackage, shipped too
    assert os.path.realpath(hf.__file__).startswith(os.path.realpath(expected) + os.sep)
