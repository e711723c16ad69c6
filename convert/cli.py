"""``gemma-convert``: a thin click shell over ``gemma_edge.convert.pipeline.convert``."""

from __future__ import annotations

import sys

import click

from ..quantize.schemes import PRESETS, ROLES, SCHEMES
from ..runtime.errors import GemmaEdgeError

_QUANT_HELP = "; ".join(f"{s.name}: {s.description}" for s in SCHEMES.values())


def _recipe(ctx, param, value: str) -> str:
    from ..quantize.schemes import parse_recipe

    try:
        parse_recipe(value)
    except GemmaEdgeError as e:
        raise click.BadParameter(str(e))
    return value


def _lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 8,32,128,512")
    if not out or min(out) < 1:
        raise click.BadParameter("give at least one positive chunk length, e.g. 8,32,128,512")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .tflite path.")
@click.option("--quant", default="int8", show_default=True, callback=_recipe,
              help=f"Weight quantization: a preset ({', '.join(PRESETS)}) or role=scheme pairs over a preset, "
                   f"e.g. 'int4,embedding=int8' (roles: {', '.join(ROLES)}). Schemes: {_QUANT_HELP}.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Context length S of the KV cache (default 2048, or the model's maximum if smaller).")
@click.option("--prefill-lengths", default="8,32,128,512", show_default=True, callback=_lengths,
              help="Prefill chunk lengths, one prefill_<T> signature each; keep a small one.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(source, output, quant, max_context, prefill_lengths, force, quiet):
    """Convert a Gemma checkpoint SOURCE to one self-describing LiteRT .tflite file.

    SOURCE is a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.model;
    Gemma 1, Gemma 2 or Gemma 3 text) or a .gguf file. The output follows LiteRT-LM's
    contract (prefill_<T> and decode signatures, an in-place KV cache) and carries the
    config, tokenizer, chat template and quantization in its metadata. Weights are
    streamed, so memory does not grow with the model size. The file is written to a
    temporary name and renamed when complete.

    \b
    Example:
      gemma-convert gemma-3-270m.gguf -o gemma3-270m-int8.tflite --quant int8
    """
    from .pipeline import convert

    try:
        r = convert(source, output, quant=quant, max_context=max_context,
                    prefill_lengths=prefill_lengths, force=force, progress=not quiet)
    except GemmaEdgeError as e:
        click.echo(f"gemma-convert: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("gemma-convert: interrupted; no output was written", err=True)
        sys.exit(130)
    c = r.config
    click.echo(
        f"wrote {r.path}: {r.file_size / 1e6:.1f} MB, Gemma {c.family} ({c.num_layers} layers, d_model "
        f"{c.hidden_size}, vocab {c.vocab_size}, {c.num_params / 1e6:.0f}M params), {r.quant}, context "
        f"{r.context_length}, prefill {','.join(map(str, r.prefill_lengths))}; "
        f"{r.seconds:.1f} s, peak memory {r.peak_rss_mb:.0f} MB", err=True)


if __name__ == "__main__":
    main()
