"""The weightless template, built without TensorFlow in this process.

Each signature (``prefill_<T>``, ``decode``) is traced and converted by ``graph.py`` in a
child process of its own, one after another, and the small results are merged here
with the flatbuffer object API. TensorFlow's converter holds ~0.3-0.8 GB per conversion
on top of its ~0.6 GB import and never returns it; in children, the converter's peak is
one signature's and the streaming writer in this process never shares memory with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ..runtime.config import GemmaConfig
from ..runtime.errors import GemmaEdgeError


def weight_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical weight names and shapes ([out, in] for linear layers). Norms hold (1 + w)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, d), "final_norm": (d,)}
    for i in range(cfg.num_layers):
        p = f"l{i}_"
        shapes |= {
            p + "attn_norm": (d,),
            p + "q": (cfg.num_heads * h, d),
            p + "k": (cfg.num_kv_heads * h, d),
            p + "v": (cfg.num_kv_heads * h, d),
            p + "o": (d, cfg.num_heads * h),
            p + "ffn_norm": (d,),
            p + "gate": (f, d),
            p + "up": (f, d),
            p + "down": (d, f),
        }
        if cfg.has_post_norms:
            shapes |= {p + "post_attn_norm": (d,), p + "post_ffn_norm": (d,)}
        if cfg.has_qk_norm:
            shapes |= {p + "q_norm": (h,), p + "k_norm": (h,)}
    return shapes


def kv_shape(cfg: GemmaConfig, context: int) -> tuple[int, int, int, int]:
    return (1, cfg.num_kv_heads, context, cfg.head_dim)  # [1, K, S, H]



ISOLATE_ABOVE_PARAMS = 100_000_000  # smaller models (tests) convert in-process: faster, memory is moot


def signature_names(prefill_lengths, score_lengths=()) -> list[str]:
    return ([f"prefill_{T}" for T in sorted(set(prefill_lengths))] + ["decode"] +
            [f"score_{T}" for T in sorted(set(score_lengths))])


def build_template(cfg: GemmaConfig, context: int, prefill_lengths: list[int], score_lengths=(),
                   isolate: bool | None = None, progress: bool = False) -> bytes:
    """Convert every signature in its own child process and merge them into one model."""
    from ai_edge_litert import schema_py_generated as fb

    signatures = signature_names(prefill_lengths, score_lengths)
    if isolate is None:
        isolate = cfg.num_params > ISOLATE_ABOVE_PARAMS
    if not isolate:
        from . import graph

        try:
            return graph.build_template(cfg, context, signatures)
        except Exception as e:  # TensorFlow reports conversion failures as assorted exceptions
            raise GemmaEdgeError(f"TensorFlow could not convert the graph ({type(e).__name__}: {e}). "
                                 "Check that tensorflow-cpu is installed (pip install 'gemma-edge[convert]') "
                                 "and that the output folder has space") from None

    from .tflite_writer import pack

    models = []
    with tempfile.TemporaryDirectory(prefix="gemma-edge-template-") as tmp:
        steps = signatures
        if progress:
            from tqdm import tqdm

            steps = tqdm(signatures, desc="converting the graph (TensorFlow, one signature at a time)",
                         unit="sig", leave=False)
        for sig in steps:
            out = os.path.join(tmp, f"{sig}.tflite")
            proc = subprocess.run(
                [sys.executable, "-m", "gemma_edge.convert.graph", json.dumps(cfg.to_dict()), str(context), sig, out],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"})
            if proc.returncode != 0:
                if proc.returncode < 0 or proc.returncode == 130:
                    raise KeyboardInterrupt
                tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
                raise GemmaEdgeError(f"TensorFlow could not convert the {sig} signature:\n{tail}\n"
                                     "Check that tensorflow-cpu is installed (pip install 'gemma-edge[convert]')")
            with open(out, "rb") as f:
                m = fb.ModelT.InitFromPackedBuf(f.read(), 0)
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

