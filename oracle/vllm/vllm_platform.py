"""Emulated CUDA platform (capability facts only) for building vLLM models on a CPU host."""
import vllm.platforms as vp
from vllm.platforms.cuda import NonNvmlCudaPlatform
from vllm.platforms.interface import DeviceCapability

RELAXED: list = []  # attention-backend selections that needed the head-size check relaxed
TRITON_STANDIN: list = []  # non-empty once _triton_without_driver made its stand-in driver active (0.9.1)

CAPS = {"sm100": (10, 0, "NVIDIA B200"), "sm90": (9, 0, "NVIDIA H100 80GB HBM3"), "sm120": (12, 0, "NVIDIA RTX PRO 6000 Blackwell")}

def _relax_v0_xformers_head_size():
    """Releases that build NemotronH on the V0 engine (0.9.x – 0.10.1.1) fall to the XFormers backend on
    the emulated GPU, whose ``XFormersImpl.__init__`` refuses a head size PagedAttention has no kernel for
    (``Head size 16 is not supported by PagedAttention``) while the model is built. As for the V1
    selection above: only on that refusal is the constructor repeated with the head size allowed, and
    that is recorded (RELAXED). The backend creates no parameter and maps no name."""
    import importlib.util

    import vllm
    from packaging.version import Version

    if Version(vllm.__version__) >= Version("0.10.2") or importlib.util.find_spec(
            "vllm.attention.backends.xformers") is None:
        return
    import vllm.attention.backends.xformers as xf

    real_init = xf.XFormersImpl.__init__

    def init(self, num_heads, head_size, *a, **k):
        try:
            return real_init(self, num_heads, head_size, *a, **k)
        except ValueError as e:
            if "is not supported by PagedAttention" not in str(e):
                raise
            real_sizes = xf.PagedAttention.__dict__["get_supported_head_sizes"]
            xf.PagedAttention.get_supported_head_sizes = staticmethod(
                lambda: list(real_sizes.__func__()) + [head_size])
            try:
                real_init(self, num_heads, head_size, *a, **k)
            finally:
                xf.PagedAttention.get_supported_head_sizes = real_sizes
            msg = f"{str(e)[:160]}... -> XFormersImpl with head size {head_size}"
            if msg not in RELAXED:
                RELAXED.append(msg)

    xf.XFormersImpl.__init__ = init


def _triton_without_driver():
    """vLLM wraps its Mamba SSD kernels in ``triton.autotune`` at import (``layers/mamba/ops/ssd_bmm.py:16``), and
    triton 3.3's ``Autotuner.__init__`` asks the active driver for its benchmarker; a CPU host has no active driver
    (``RuntimeError: 0 active drivers``). From 0.9.2 ``triton_utils/importing.py`` then swaps in a placeholder
    triton; 0.9.1 does not, and importing ``models/nemotron_h.py`` fails. For 0.9.1 only, a stand-in driver is made
    active whose benchmarker raises if ever called: no kernel runs in the oracle, and autotuning creates no
    parameter and maps no name."""
    import vllm
    from packaging.version import Version

    if Version(vllm.__version__) >= Version("0.9.2"):
        return
    import importlib

    try:
        td = importlib.import_module("triton.runtime.driver")  # the module (``triton.runtime.driver`` is its object)
    except ImportError:
        return
    try:
        td._create_driver()
        return
    except RuntimeError:
        pass

    def bench(*a, **k):
        raise RuntimeError("oracle host: no triton driver; no kernel may run here")

    class NoDriver:
        def get_benchmarker(self):
            return bench

    td.driver.set_active(NoDriver())
    TRITON_STANDIN.append("triton stand-in driver (benchmarker raises if called): 0.9.1 imports its Mamba SSD "
                          "kernels through triton.autotune, which needs an active driver")


def install(name="sm100"):
    major, minor, dev = CAPS[name]
    class EmulatedCudaPlatform(NonNvmlCudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id=0):
            return DeviceCapability(major=major, minor=minor)
        @classmethod
        def get_device_name(cls, device_id=0):
            return dev
        @classmethod
        def get_device_total_memory(cls, device_id=0):
            return 180 << 30
        @classmethod
        def is_fully_connected(cls, ids):
            return True
        @classmethod
        def is_pin_memory_available(cls):
            return False
        @classmethod
        def device_count(cls):
            return 1

        @classmethod
        def get_attn_backend_cls(cls, *args, **kwargs):
            """The real selection; only if it finds no backend *because of the head size* (the tiny
            checkpoints' head_dim 16 is below every kernel's minimum in some releases, real models use
            128) is it repeated with the head-size check relaxed, and that is recorded (RELAXED).
            The backend creates no parameter and maps no name."""
            try:
                return super().get_attn_backend_cls(*args, **kwargs)
            except ValueError as e:
                if "No valid attention backend" not in str(e) or "head_size not supported" not in str(e):
                    raise
                from vllm.v1.attention.backend import AttentionBackend

                real = AttentionBackend.__dict__["validate_configuration"]

                def relaxed(klass, *a, **k):
                    return [r for r in real.__func__(klass, *a, **k) if r != "head_size not supported"]

                AttentionBackend.validate_configuration = classmethod(relaxed)
                try:
                    out = super().get_attn_backend_cls(*args, **kwargs)
                finally:
                    AttentionBackend.validate_configuration = real
                RELAXED.append(f"{str(e)[:160]}... -> {out}")
                return out
    EmulatedCudaPlatform.__name__ = f"EmulatedCudaPlatform_{name}"
    # releases before 0.20.0 also ask torch directly (vllm_flash_attn's _is_fa2_supported): the same
    # capability fact, answered the same way
    import torch

    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    vp.current_platform = EmulatedCudaPlatform()
    _relax_v0_xformers_head_size()  # after the platform: the backend module reads it on import
    _triton_without_driver()
    return vp.current_platform
