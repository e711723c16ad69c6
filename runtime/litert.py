"""LiteRT's CompiledModel, opened without importing ml_dtypes.

``ai_edge_litert.compiled_model`` imports ``tensor_buffer``, whose class body names
``ml_dtypes.bfloat16``; importing ml_dtypes 0.7 costs about 0.4 s (its extension registers
every float8/float4 type with numpy), more than loading the 270M model itself. gemma-edge
only moves float32 and int32 through TensorBuffers, so it drives the same native wrappers
the public classes call (``_pywrap_litert_compiled_model_wrapper`` and
``_pywrap_litert_tensor_buffer_wrapper``, with the public ``Environment`` and ``Options``)
through the few methods below. Should a later ai-edge-litert rename those wrappers, the
public classes are used instead: the same calls, 0.4 s slower to import.
"""

from __future__ import annotations

import os

import numpy as np

# numpy dtype -> the dtype names the native wrapper takes (tensor_buffer.TensorBuffer's table)
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32", np.dtype(np.int8): "int8",
           np.dtype(np.uint8): "uint8", np.dtype(np.float16): "float16", np.dtype(np.bool_): "bool"}


def available() -> bool:
    """Does this ai-edge-litert have the CompiledModel API?"""
    try:
        _native()
    except ImportError:
        try:
            import ai_edge_litert.compiled_model  # noqa: F401
        except ImportError:
            return False
    return True


def _native():
    """(compiled-model wrapper, tensor-buffer wrapper) modules, or ImportError."""
    from ai_edge_litert import _pywrap_litert_compiled_model_wrapper as cm
    from ai_edge_litert import _pywrap_litert_tensor_buffer_wrapper as tb

    for mod, names in ((cm, ("CreateCompiledModelFromFile",)), (tb, ("WriteTensorBuffer", "ReadTensorToBuffer"))):
        for n in names:
            if not hasattr(mod, n):
                raise ImportError(f"{mod.__name__} has no {n}")
    return cm, tb


def library_folder() -> str:
    """The folder of LiteRT's native libraries (ai_edge_litert's)."""
    import ai_edge_litert

    return os.path.dirname(os.path.realpath(ai_edge_litert.__file__))


def compile_file(path: str, threads: int, weight_cache_path: str = ""):
    """A CompiledModel of the file at ``path`` on the CPU (XNNPACK) with ``threads`` threads,
    its packed weights cached at ``weight_cache_path`` when given. Raises what the native
    loader raises (RuntimeError/ValueError) for a file it cannot load."""
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    opts = Options(HardwareAccelerator.CPU, cpu_options=CpuOptions(
        num_threads=threads, xnnpack_weight_cache_path=weight_cache_path))
    try:
        cm, tb = _native()
        flat = opts._as_flat_kwargs()
    except (ImportError, AttributeError):
        from ai_edge_litert.compiled_model import CompiledModel

        return CompiledModel.from_file(path, options=opts)
    from ai_edge_litert.environment import Environment, EnvironmentOptions

    import ai_edge_litert

    env = Environment.create(options=EnvironmentOptions(runtime_path=os.path.dirname(ai_edge_litert.__file__)))
    return _Model(cm.CreateCompiledModelFromFile(env.capsule, path, **flat), env, tb)


class _Buffer:
    """A TensorBuffer: ``write``, ``read`` and ``capsule``, as the public class has them."""

    __slots__ = ("capsule", "_env", "_tb")

    def __init__(self, capsule, env, tb):
        self.capsule, self._env, self._tb = capsule, env, tb

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._tb.WriteTensorBuffer(self.capsule, array.reshape(-1), _DTYPES[array.dtype])

    def read(self, num_elements: int, dtype) -> np.ndarray:
        out = np.empty(num_elements, dtype)
        self._tb.ReadTensorToBuffer(self.capsule, out, _DTYPES[out.dtype])
        return out


class _Model:
    """A CompiledModel: the methods gemma-edge calls, as the public class has them. It keeps
    the Environment alive as long as itself (its buffers keep it too)."""

    def __init__(self, native, env, tb):
        self._model, self._env, self._tb = native, env, tb

    def get_signature_list(self) -> dict:
        return self._model.GetSignatureList()

    def get_input_tensor_details(self, signature: str) -> dict:
        return self._model.GetInputTensorDetails(signature)

    def get_output_tensor_details(self, signature: str) -> dict:
        return self._model.GetOutputTensorDetails(signature)

    def create_input_buffer_by_name(self, signature: str, name: str) -> _Buffer:
        return _Buffer(self._model.CreateInputBufferByName(signature, name), self._env, self._tb)

    def create_output_buffer_by_name(self, signature: str, name: str) -> _Buffer:
        return _Buffer(self._model.CreateOutputBufferByName(signature, name), self._env, self._tb)

    def run_by_name(self, signature: str, inputs: dict, outputs: dict) -> None:
        self._model.RunByName(signature, {k: v.capsule for k, v in inputs.items()},
                              {k: v.capsule for k, v in outputs.items()})
