"""``gemma-convert``: a thin click shell over ``gemma_edge.convert.pipeline.convert``."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..quantize.schemes import KINDS, PRESETS, ROLES, SCHEMES
from ..runtime.errors import GemmaEdgeError
from ..runtime.process import exit_code, terminate_as_interrupt
from .pipeline import DEFAULT_EMBED, DEFAULT_PREFILL, DEFAULT_SCORE

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
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 8,32,128")
    if not out or min(out) < 1:
        raise click.BadParameter("give at least one positive chunk length, e.g. 8,32,128")
    return out


def _score_lengths(ctx, param, value: str) -> tuple[int, ...]:
    if value.strip() == "0":
        return ()
    return _lengths(ctx, param, value)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="gemma-convert", message="%(prog)s %(version)s")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .tflite path.")
@click.option("--quant", default="int8", show_default=True, callback=_recipe,
              help=f"Weight quantization: a preset ({', '.join(PRESETS)}), optionally followed by key=scheme "
                   f"pairs, e.g. 'int4-b32,embedding=int8,ffn_down=int8'. Keys are roles ({', '.join(ROLES)}) "
                   f"or single kinds ({', '.join(k for k in KINDS if k not in ROLES)}). Schemes: {_QUANT_HELP}.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Context length S of the KV cache (default 2048, or the model's maximum if smaller).")
@click.option("--prefill-lengths", default=",".join(map(str, DEFAULT_PREFILL)), show_default=True, callback=_lengths,
              help="Prefill chunk lengths, one prefill_<T> signature each; keep a small one. Each costs "
                   "memory at load (~7 MB on the 270M) and a larger T a larger arena: 512 prefills ~7% "
                   "faster for ~50 MB more at context 2048.")
@click.option("--score-lengths", "--score-length", "score_length", default=",".join(map(str, DEFAULT_SCORE)),
              show_default=True, callback=_score_lengths,
              help="Tokens per call of the score_<T> signatures (logits for every position): `gemma-edge eval` "
                   "uses the longest, speculative decoding (--draft) the shortest that holds its drafted "
                   "tokens; 0 leaves them out. Every signature is compiled at each load: on the 270M a "
                   "score signature costs ~7 MB and ~13 ms of load at int8, ~75 ms at int4-b32 (XNNPACK checks "
                   "every block scale), so a file that only chats, or only drafts, loads faster with 0. "
                   "With --for-draft the default is 0 (but with --report, whose perplexity reads through them).")
@click.option("--embed-lengths", default=",".join(map(str, DEFAULT_EMBED)), show_default=True, callback=_lengths,
              help="An embedding model's chunk lengths, one embed_<T> signature each, besides the context "
                   "(the longest text it embeds); short texts are packed together into one chunk.")
@click.option("--report", is_flag=True,
              help="After writing, print what quantization cost: the relative RMS error of the weights "
                   "per tensor role (and the worst tensor), and with --eval-text the perplexity of the "
                   "new file next to an fp32 conversion's.")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A UTF-8 text file for --report's perplexity (BOS + text, one window of up to the "
                   "context). The fp32 reference is converted on the fly into a temporary file.")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=None,
              help="Score at most this many tokens of --eval-text (default: the context length).")
@click.option("--lora", "lora", type=click.Path(), default=None, metavar="ADAPTER_DIR",
              help="A peft LoRA adapter (the directory save_pretrained wrote: adapter_config.json, "
                   "adapter_model.safetensors) to merge into the weights as they are converted.")
@click.option("--calibrate", "calibrate", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Calibrated quantization: measure each linear input's range and importance on FILE (UTF-8 "
                   "text), or, with no FILE, on text the model writes itself; migrate the ranges into the weights "
                   "(SmoothQuant) and search block scales for the least important error (imatrix). Same file "
                   "layout and speed; costs a minute or two more.")
@click.option("--for-draft", is_flag=True,
              help="Make a faster speculative draft (`gemma-edge run MODEL --draft THIS`): store the "
                   "embedding's rows of frequent pieces as a table of their own and add a decode_hot "
                   "signature whose LM head computes only those rows' logits (17408 of Gemma's 262144) "
                   "and those of 32 recent tokens of the context, the draft's step (with a context above "
                   "2048, one more beside each shorter decode span). The file still runs alone as any "
                   "other; it costs a signature's memory at load (~7 MB on the 270M). A draft needs no "
                   "score_<T> signatures, so unless --score-lengths is given it gets none: it loads in "
                   "about half the time (0.31 s against 0.56 s for the 270M int4-b32).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(source, output, quant, max_context, prefill_lengths, score_length, embed_lengths, report, eval_text,
         eval_tokens, lora, calibrate, for_draft, force, quiet):
    """Convert a Gemma checkpoint SOURCE to one self-describing LiteRT .tflite file.

    SOURCE is a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.model
    or tokenizer.json; Gemma 1, 2, 3 or 4 text) or a .gguf file. The output follows LiteRT-LM's
    contract (prefill_<T> and decode signatures, an in-place KV cache) and carries the
    config, tokenizer, chat template and quantization in its metadata. Weights are
    streamed, so memory does not grow with the model size. The file is written to a
    temporary name and renamed when complete.

    An EmbeddingGemma checkpoint (its sentence-transformers folder, or a gemma-embedding GGUF)
    becomes an embedding model: embed_<T> signatures (--embed-lengths), its task prompts
    stored in the file; run it with `gemma-edge embed`.

    \b
    Examples:
      gemma-convert gemma-3-270m.gguf -o gemma3-270m-int8.tflite --quant int8
      gemma-convert gemma-3-270m.gguf -o m-int4.tflite --quant int4 --report --eval-text wiki.txt
      gemma-convert ckpt/ -o m.tflite --quant int4,embedding=int8,attention=int8
      gemma-convert gemma-3-270m/ --lora my-adapter/ -o tuned-int8.tflite
      gemma-convert embeddinggemma-300m/ -o embeddinggemma-int8.tflite
      gemma-convert gemma-3-270m.gguf -o draft-int4.tflite --quant int4-b32 --for-draft
    """
    from .pipeline import convert, perplexity_vs_fp32

    terminate_as_interrupt()  # SIGTERM cleans up as Ctrl-C does: no half file, no orphaned child

    if eval_text and not report:
        report = True  # an evaluation text only makes sense in the report
    if for_draft and not report and click.get_current_context().get_parameter_source(
            "score_length") is click.core.ParameterSource.DEFAULT:
        score_length = ()  # a draft is checked by its model's score_<T>, never its own
    text = None
    if eval_text:
        try:
            with open(eval_text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            click.echo(f"gemma-convert: error: {eval_text} is not UTF-8 text ({e})", err=True)
            sys.exit(2)
    try:
        r = convert(source, output, quant=quant, max_context=max_context,
                    prefill_lengths=prefill_lengths, force=force, progress=not quiet,
                    score_length=score_length, report=report, lora=lora, calibrate=calibrate,
                    notes=lambda line: click.echo(f"gemma-convert: {line}", err=True), embed_lengths=embed_lengths,
                    for_draft=for_draft)
    except GemmaEdgeError as e:
        click.echo(f"gemma-convert: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (runtime/process.py)
        click.echo("gemma-convert: interrupted; no output was written", err=True)
        sys.exit(exit_code(e))
    c = r.config
    click.echo(
        f"wrote {r.path}: {r.file_size / 1e6:.1f} MB, Gemma {c.family} ({c.num_layers} layers, d_model "
        f"{c.hidden_size}, vocab {c.vocab_size}, {c.num_params / 1e6:.0f}M params), {r.quant}, context "
        f"{r.context_length}, "
        + (f"embed {','.join(map(str, r.embed_lengths))}; " if r.embed_lengths else
           f"prefill {','.join(map(str, r.prefill_lengths))}; ")
        + f"{r.seconds:.1f} s, peak memory {r.peak_rss_mb:.0f} MB"
        + (f"; LoRA {lora} merged" if lora else ""), err=True)
    ppl = None
    if text and r.embed_lengths:
        click.echo("gemma-convert: note: --eval-text measures a causal LM's perplexity; an embedding model has "
                   "none, so only the weights' error is reported", err=True)
        text = None
    if text:
        from ..runtime import native_log

        native_log.silence_process()  # LiteRT's native INFO log, some of it at exit
        try:
            ppl = perplexity_vs_fp32(source, r, text, eval_tokens, progress=not quiet)
        except GemmaEdgeError as e:
            click.echo(f"gemma-convert: error: {r.path} was written, but the perplexity failed: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            click.echo(f"gemma-convert: interrupted during the perplexity; {r.path} was written", err=True)
            sys.exit(exit_code(e))
        ppl["text"] = eval_text
    if report:
        from ..quantize.report import format_report

        click.echo(format_report(list(r.weight_errors), ppl, r.grid_blocks))


if __name__ == "__main__":
    main()
