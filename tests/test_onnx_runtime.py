"""onnx_runtime.cpu_info: the CPU facts that decide which INT8 kernels ONNX Runtime runs."""

from __future__ import annotations

from pipeline.serving import onnx_runtime as rt

_X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme avx2 {extra}

processor\t: 1
"""


def test_x86_flags_name_vnni_and_avx512(tmp_path):
    for extra, vnni, avx512 in (
        ("", False, False),
        ("avx512f avx512_vnni", True, True),
        ("avx_vnni", True, False),
        ("avx512f avx512bw", False, True),
    ):
        path = tmp_path / "cpuinfo"
        path.write_text(_X86.format(extra=extra))
        assert rt.cpu_info(path) == {"model": "AMD EPYC 7B13", "vnni": vnni, "avx512": avx512}


def test_other_architectures_and_missing_files_say_unknown(tmp_path):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n")
    assert rt.cpu_info(arm)["vnni"] is None
    assert rt.cpu_info(tmp_path / "absent")["vnni"] is None
