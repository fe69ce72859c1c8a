"""setup.py's source and arch selection, and .ci/check_dist.py's file checks. These need the
checkout (setup.py, .ci/); the installed wheel's run (.ci/install_check.sh) leaves them out."""

import importlib.util
import io
import os
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, relpath):
    path = os.path.join(ROOT, relpath)
    if not os.path.exists(path):
        pytest.skip(f"{relpath} is not here (not a checkout)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup.py runs setup() only as __main__
    return module


@pytest.fixture(scope="module")
def setup_py():
    return load("selattn_setup", "setup.py")


@pytest.fixture(scope="module")
def check_dist():
    return load("selattn_check_dist", os.path.join(".ci", "check_dist.py"))


def test_gencode_has_sm_code_for_each_arch_and_ptx_for_the_highest(setup_py, monkeypatch):
    monkeypatch.delenv("SELATTN_CUDA_ARCHS", raising=False)  # CI sets it
    assert setup_py._cuda_archs() == ["80", "90"]
    assert setup_py._gencode_flags(["90", "80"]) == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert setup_py._gencode_flags(["80", "90a"])[-1] == "-gencode=arch=compute_90,code=compute_90"
    assert setup_py._compiled_archs(["80", "90"]) == ["sm_80", "sm_90", "compute_90"]


def test_cuda_archs_env(setup_py, monkeypatch):
    monkeypatch.setenv("SELATTN_CUDA_ARCHS", "8.0, 9.0;100")
    assert setup_py._cuda_archs() == ["80", "90", "100"]
    monkeypatch.setenv("SELATTN_CUDA_ARCHS", "sm_90")
    with pytest.raises(ValueError, match="SELATTN_CUDA_ARCHS"):
        setup_py._cuda_archs()


def test_cuda_sources_recurse_but_skip_emulation(setup_py, tmp_path, monkeypatch):
    for rel in ["cuda/a.cu", "cuda/prefill/b.cu", "cuda/prefill/b.cuh", "cuda/decode/deep/c.cu",
                "cuda/emulation/host.cu", "cuda/prefill/emulation/host2.cu", "cpu/x.cpp"]:
        path = tmp_path / "csrc" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    monkeypatch.setattr(setup_py, "ROOT", str(tmp_path))
    assert setup_py._cuda_sources() == [os.path.join("csrc", "cuda", *p.split("/")) for p in
                                        ["a.cu", "decode/deep/c.cu", "prefill/b.cu"]]


def test_cuda_sources_of_this_checkout(setup_py):
    found = setup_py._cuda_sources()
    assert found and all(s.endswith(".cu") and "emulation" not in s.split(os.sep) for s in found)


def _sdist(path, names):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(f"selattn_ext-0.1.0/{name}")
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))


def test_check_dist_finds_a_missing_nested_header(check_dist, tmp_path):
    want = check_dist.tracked_files(ROOT, check_dist.SDIST_DIRS) + list(check_dist.SDIST_FILES)
    nested = [n for n in want if n.startswith("csrc/") and n.count("/") >= 2]
    assert nested, "expected sources in csrc subfolders"
    _sdist(tmp_path / "full.tar.gz", want)
    assert check_dist.main(["", "sdist", str(tmp_path / "full.tar.gz")]) == 0
    _sdist(tmp_path / "short.tar.gz", [n for n in want if n != nested[0]])
    names = check_dist.sdist_names(str(tmp_path / "short.tar.gz"))
    assert check_dist.missing_from_sdist(names, ROOT) == [nested[0]]


def test_check_dist_finds_a_missing_subpackage(check_dist, tmp_path):
    modules = [n for n in check_dist.tracked_files(ROOT, ["selattn_ext"]) if n.endswith(".py")]
    good = modules + ["selattn_ext/_build_info.py", "selattn_ext/_C.cpython-311-x86_64-linux-gnu.so",
                      "selattn_ext-0.1.0.dist-info/licenses/LICENSE"]
    assert check_dist.missing_from_wheel(good, ROOT) == []
    sub = next(n for n in modules if n.startswith("selattn_ext/integrations/"))
    with zipfile.ZipFile(tmp_path / "w.whl", "w") as whl:
        for name in good:
            if name != sub:
                whl.writestr(name, "")
    names = check_dist.wheel_names(str(tmp_path / "w.whl"))
    assert check_dist.missing_from_wheel(names, ROOT) == [sub]
    assert check_dist.missing_from_wheel([n for n in good if "_C" not in n], ROOT) == [
        "selattn_ext/_C*.so (the compiled extension)"]
