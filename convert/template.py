"""The weightless template: the graph of every signature, with weights as inputs.

For models over ``ISOLATE_ABOVE_PARAMS`` parameters, each signature (``prefill_<T>``,
``decode``, ``score_<T>``, or ``embed_<T>``) is traced and converted by ``graph.py`` in a child process of its
own, one after another, and the small results are merged here with the flatbuffer object
API: TensorFlow's converter holds ~0.3-0.8 GB per conversion on top of its ~0.6 GB import
and never returns it, so in children the converter's peak is one signature's and the
streaming writer in this process never shares memory with it. Smaller models (tests)
convert in this process, all signatures at once: faster, and their memory is moot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ..runtime import contract
from ..runtime.config import GemmaConfig
from ..runtime.errors import GemmaEdgeError
from ..runtime.process import child_dies_with_parent

WORKDIR_PREFIX = "gemma-edge-template-"  # + the converting process's id
_DISK_FULL = ("No space left on device", "File too large", "Disk quota exceeded", "ENOSPC", "EFBIG")
# TensorFlow's converter first saves the functions as a SavedModel in the temporary folder; when
# that write fails it says nothing and falls back to a path that takes one function only (and
# drops the signature), so a full folder shows as an unrelated ValueError or a model without
# signatures. Less room than this there (free space or ulimit -f) is taken as the cause.
_TMP_NEED = 32 << 20


def _temp_room() -> int | None:
    """Bytes a file in the temporary folder can still take: its free space, capped by ulimit -f."""
    import resource

    try:
        st = os.statvfs(tempfile.gettempdir())
    except OSError:
        return None
    room = st.f_bavail * st.f_frsize
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return room if limit == resource.RLIM_INFINITY else min(room, limit)


def _conversion_error(what: str, detail: str, returncode: int | None) -> GemmaEdgeError:
    """Why TensorFlow failed, in the user's terms: a full disk or a file size limit is not a
    missing TensorFlow."""
    tail = "\n".join(detail.strip().splitlines()[-5:])
    tmp = tempfile.gettempdir()
    room = _temp_room()
    if any(s in detail for s in _DISK_FULL) or returncode == -25 or (room is not None and room < _TMP_NEED):
        return GemmaEdgeError(f"TensorFlow could not write {what}: the temporary folder {tmp} is full or a file "
                              "size limit (ulimit -f) was reached. Free space there, or set TMPDIR to a folder "
                              "with room")
    if returncode is not None and returncode < 0:
        return GemmaEdgeError(f"TensorFlow's converter of {what} was killed (signal {-returncode}); if memory ran "
                              "out, close other programs and try again")
    return GemmaEdgeError(f"TensorFlow could not convert {what}:\n{tail}\nCheck that tensorflow-cpu is installed "
                          "(pip install 'gemma-edge[convert]')")


def _remove_stale_workdirs() -> None:
    """Temporary folders of conversions whose process is gone (a SIGKILL cannot be caught)."""
    import re
    import shutil

    from ..runtime.fileio import _pid_alive

    try:
        entries = os.listdir(tempfile.gettempdir())
    except OSError:
        return
    for name in entries:
        m = re.fullmatch(rf"{WORKDIR_PREFIX}([0-9]+)-.*", name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)


ISOLATE_ABOVE_PARAMS = 100_000_000  # smaller models (tests) convert in-process: faster, memory is moot


def build_template(cfg: GemmaConfig, context: int, prefill_lengths: list[int], score_lengths=(), spans=(),
                   isolate: bool | None = None, progress: bool = False, embed_lengths=(), row_scaled=(),
                   decode_hot: bool = False, hot_spans=()) -> bytes:
    """Convert every signature in its own child process and merge them into one model
    (``embed_lengths``: an embedding model's embed_<T> signatures instead; ``row_scaled``: the
    vocabulary tables whose per-row scales are a tensor of their own, ``contract.vocab_tables``;
    ``decode_hot``: add that signature, a draft's step, and ``hot_spans``' decode_hot_s<S'>)."""
    from ai_edge_litert import schema_py_generated as fb

    signatures = contract.signature_names(prefill_lengths, score_lengths, spans, embed_lengths, decode_hot, hot_spans)
    if isolate is None:
        isolate = cfg.num_params > ISOLATE_ABOVE_PARAMS
    if not isolate:
        from . import graph

        try:
            return graph.build_template(cfg, context, signatures, row_scaled)
        except Exception as e:  # TensorFlow reports conversion failures as assorted exceptions
            raise _conversion_error("the graph", f"{type(e).__name__}: {e}", None) from None

    from .tflite_writer import pack

    models = []
    _remove_stale_workdirs()
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as tmp:
        steps = signatures
        if progress:
            from tqdm import tqdm

            steps = tqdm(signatures, desc="converting the graph (TensorFlow, one signature at a time)",
                         unit="sig", leave=False)
        for sig in steps:
            out = os.path.join(tmp, f"{sig}.tflite")
            proc = subprocess.run(
                [sys.executable, "-m", "gemma_edge.convert.graph", json.dumps(cfg.to_dict()), str(context), sig, out,
                 json.dumps(list(row_scaled))],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child_dies_with_parent,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"})
            if proc.returncode != 0:
                if proc.returncode in (-2, 130):  # Ctrl-C reached the child too
                    raise KeyboardInterrupt
                raise _conversion_error(f"the {sig} signature", proc.stderr, proc.returncode)
            with open(out, "rb") as f:
                m = fb.ModelT.InitFromPackedBuf(f.read(), 0)
            if not m.signatureDefs:  # TensorFlow could not save its SavedModel (see _TMP_NEED)
                raise _conversion_error(f"the {sig} signature", proc.stderr + "\nthe converted model has no "
                                        "signature", proc.returncode)
            # a converter given one function names its signature "serving_default"
            m.signatureDefs[0].signatureKey = sig.encode()
            m.subgraphs[m.signatureDefs[0].subgraphIndex].name = sig.encode()
            models.append(m)
    return pack(merge_models(models))


def merge_models(models):
    """One model holding every subgraph and signature of ``models`` (no control-flow ops)."""
    out = models[0]
    codes = {(oc.builtinCode, oc.deprecatedBuiltinCode, oc.version, oc.customCode): i
             for i, oc in enumerate(out.operatorCodes)}
    for m in models[1:]:
        remap = []
        for oc in m.operatorCodes:
            key = (oc.builtinCode, oc.deprecatedBuiltinCode, oc.version, oc.customCode)
            if key not in codes:
                codes[key] = len(out.operatorCodes)
                out.operatorCodes.append(oc)
            remap.append(codes[key])
        buf_off, sg_off = len(out.buffers), len(out.subgraphs)
        out.buffers.extend(m.buffers)  # m's empty sentinel buffer 0 stays empty at buf_off
        for sg in m.subgraphs:
            for t in sg.tensors:
                t.buffer += buf_off
            for op in sg.operators:
                op.opcodeIndex = remap[op.opcodeIndex]
            out.subgraphs.append(sg)
        for sig in m.signatureDefs:
            sig.subgraphIndex += sg_off
            out.signatureDefs.append(sig)
    return out

