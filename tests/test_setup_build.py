"""llama.cpp is built for the CPU it runs on: CMAKE_ARGS derived from recorded /proc/cpuinfo flag lines."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import llamacpp_build  # noqa: E402

# `flags` lines recorded on machines of this kind (and one common server CPU).
EPYC_AVX2 = (
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid "
    "extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave "
    "avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext "
    "invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx "
    "smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr arat npt nrip_save umip vaes "
    "vpclmulqdq rdpid fsrm"
)
XEON_AVX512 = (  # Cascade Lake: AVX-512 with VNNI, no BF16, no VBMI, no AMX
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
    "hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust "
    "bmi1 avx2 smep bmi2 erms invpcid mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw "
    "avx512vl xsaveopt xsavec xgetbv1 xsaves arat pku ospke avx512_vnni md_clear arch_capabilities"
)
SAPPHIRE_RAPIDS_AMX = (  # recorded on this project's Xeon: reports AMX, whose tile code died with SIGILL
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes "
    "xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault ssbd ibrs ibpb stibp ibrs_enhanced "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt "
    "clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat "
    "avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid "
    "bus_lock_detect cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk ibt amx_bf16 avx512_fp16 "
    "amx_tile amx_int8 flush_l1d arch_capabilities"
)
ALWAYS_OFF = "-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


def cpuinfo(flags_line: str) -> str:
    return f"processor\t: 0\nmodel name\t: some cpu\n{flags_line}\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\n{flags_line}\n"


def test_epyc_avx2_only_gets_no_avx512():
    args = llamacpp_build.cmake_args(llamacpp_build.parse_flags(cpuinfo(EPYC_AVX2)))
    assert args == (ALWAYS_OFF + " -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF"
                    " -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF")


def test_cascade_lake_gets_avx512_and_vnni_only():
    args = llamacpp_build.cmake_args(llamacpp_build.parse_flags(cpuinfo(XEON_AVX512)))
    assert args == (ALWAYS_OFF + " -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF"
                    " -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF")


def test_sapphire_rapids_gets_everything_but_amx():
    args = llamacpp_build.cmake_args(llamacpp_build.parse_flags(cpuinfo(SAPPHIRE_RAPIDS_AMX)))
    assert args == (ALWAYS_OFF + " -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON"
                    " -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON")
    assert "AMX_TILE=ON" not in args and "NATIVE=ON" not in args


def test_unknown_cpu_builds_the_portable_baseline():
    flags = llamacpp_build.parse_flags("processor : 0\nFeatures : fp asimd\n")
    assert flags == frozenset()
    assert "=ON" not in llamacpp_build.cmake_args(flags)


def test_each_flag_set_has_its_own_wheel_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path))
    dirs = {name: llamacpp_build.wheel_dir(llamacpp_build.parse_flags(cpuinfo(line)))
            for name, line in [("epyc", EPYC_AVX2), ("xeon", XEON_AVX512), ("spr", SAPPHIRE_RAPIDS_AMX)]}
    assert len(set(dirs.values())) == 3
    assert all(d.parent == tmp_path / "wheels" for d in dirs.values())
    assert "avx512" not in dirs["epyc"].name and "avx512_bf16" in dirs["spr"].name
    custom = llamacpp_build.wheel_dir(frozenset(), custom_args="-DGGML_CUDA=ON")
    assert custom not in dirs.values() and "custom" in custom.name


@pytest.mark.parametrize("command", ["cmake-args", "wheel-dir", "package"])
def test_command_line(command, capsys, monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert llamacpp_build.main([command]) == 0
    assert capsys.readouterr().out.strip()
    assert llamacpp_build.main(["nonsense"]) == 2
