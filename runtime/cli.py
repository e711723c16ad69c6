"""``gemma-edge``: run, chat, bench and inspect gemma-edge files. A thin shell over the API."""

from __future__ import annotations

import functools
import io
import json
import os
import sys

import click

from .errors import GemmaEdgeError


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GemmaEdgeError as e:
            click.echo(f"gemma-edge: error: {e}", err=True)
            sys.exit(2)
    return wrapper


def _sampling_options(fn):
    for opt in reversed([
        click.option("--max-tokens", "-n", type=int, default=256, show_default=True,
                     help="Most tokens to generate."),
        click.option("--temperature", "-t", type=float, default=0.8, show_default=True,
                     help="0 = greedy (argmax)."),
        click.option("--top-k", type=int, default=64, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="1 = off."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="0 = off."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                     help="Penalty for the last 64 tokens; 1 = off."),
        click.option("--seed", type=int, default=None, help="Makes sampled runs repeatable."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: cores, up to 4)."),
    ]):
        fn = opt(fn)
    return fn


def _sampling_kwargs(kw) -> dict:
    from .sampling import validate_sampling

    validate_sampling(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                      min_p=kw["min_p"], repetition_penalty=kw["repeat_penalty"], seed=kw["seed"])
    return dict(max_tokens=kw["max_tokens"], temperature=kw["temperature"], top_k=kw["top_k"],
                top_p=kw["top_p"], min_p=kw["min_p"], repetition_penalty=kw["repeat_penalty"],
                seed=kw["seed"], stop=list(kw["stop"]) or None)


def _silence_native_stderr() -> None:
    """LiteRT's native library logs INFO lines (accelerator registry, plugins) to fd 2, some
    only at exit. Point fd 2 at /dev/null for native code and keep Python's sys.stderr on
    the real stderr. GEMMA_EDGE_DEBUG=1 keeps the native log."""
    if os.environ.get("GEMMA_EDGE_DEBUG"):
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = io.TextIOWrapper(io.FileIO(real, "w"), encoding="utf-8", errors="replace",
                                      line_buffering=True, write_through=True)
    except (OSError, ValueError):
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Run Gemma models converted by gemma-convert on CPUs, Raspberry Pis and phones.

    \b
    gemma-edge run MODEL -p "Why is the sky blue?"     stream a completion
    gemma-edge run MODEL --chat -p "Hi"               one chat turn (Gemma template)
    gemma-edge chat MODEL                             interactive multi-turn chat
    gemma-edge bench MODEL                            prefill/decode speed, memory
    gemma-edge eval MODEL --text FILE                 perplexity of a text
    gemma-edge info MODEL                             what the file holds
    gemma-edge serve MODEL                            OpenAI-compatible HTTP server
    gemma-edge pack MODEL                             .litertlm for LiteRT-LM (Android, iOS)

    Set GEMMA_EDGE_DEBUG=1 to see LiteRT's own log.
    """
    _silence_native_stderr()


@main.command()
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Prompt text; '-' reads it from stdin.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System prompt (implies --chat).")
@click.option("-v", "--verbose", is_flag=True, help="Statistics on stderr.")
@_sampling_options
@_handle_errors
def run(model, prompt, chat, system, verbose, **kw):
    """Stream a continuation of PROMPT from MODEL; only generated text goes to stdout."""
    sampling = _sampling_kwargs(kw)
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GemmaEdgeError(f"the prompt on stdin is not valid UTF-8 (byte {e.start}); "
                                 "convert it to UTF-8 first") from None
    if not prompt.strip():
        raise GemmaEdgeError("the prompt is empty; pass some text with -p")
    from .engine import load

    m = load(model, threads=kw["threads"])
    if chat or system:
        stream = m.chat(system=system).send(prompt, **sampling)
    else:
        stream = m.stream_generate(prompt, **sampling)
    last, interrupted = None, False
    try:
        for r in stream:
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except KeyboardInterrupt:  # Ctrl-C ends the answer: the text so far stays, exit 130 says it was cut
        interrupted = True
    sys.stdout.write("\n")
    if verbose and last is not None:
        click.echo(f"[{last.finish_reason}] prompt {last.prompt_tokens} tokens ({last.prompt_tps:.1f} tok/s, "
                   f"first token after {last.time_to_first_token * 1000:.0f} ms), generated "
                   f"{last.generation_tokens} tokens ({last.generation_tps:.1f} tok/s); load "
                   f"{m.load_seconds:.2f} s; backend {m.backend.name}", err=True)
    if interrupted:
        sys.stdout.flush()
        sys.exit(130)


@main.command("chat")
@click.argument("model", type=click.Path())
@click.option("--system", default=None, help="System prompt, folded into the first user turn.")
@_sampling_options
@_handle_errors
def chat_cmd(model, system, **kw):
    """Interactive multi-turn chat. Ctrl-C stops an answer, Ctrl-D exits."""
    sampling = _sampling_kwargs(kw)
    from .engine import load

    m = load(model, threads=kw["threads"])
    conv = m.chat(system=system)
    click.echo(f"gemma-edge chat: {model} (context {m.context_length} tokens). Ctrl-C stops an answer, "
               "Ctrl-D exits.", err=True)
    while True:
        try:
            sys.stdout.write("> ")  # input()'s own prompt goes to fd 2, which is silenced
            sys.stdout.flush()
            msg = input()
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        except UnicodeDecodeError as e:  # stdin in a strict UTF-8 locale
            click.echo(f"gemma-edge: error: that line is not valid UTF-8 (byte {e.start}); type it again", err=True)
            continue
        if not msg.strip():
            continue
        dropped = conv.dropped_turns
        try:
            for r in conv.send(msg, **sampling):
                sys.stdout.write(r.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo(" [stopped]", err=True)
        except GemmaEdgeError as e:  # one bad message (not UTF-8, longer than the context): say so, go on
            click.echo(f"gemma-edge: error: {e}", err=True)
            continue
        sys.stdout.write("\n")
        if conv.dropped_turns > dropped:
            click.echo(f"[the context was full: the oldest {conv.dropped_turns - dropped} turn(s) were dropped]",
                       err=True)


@main.command()
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("-n", "--gen-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def bench(model, prompt_tokens, gen_tokens, runs, threads, as_json):
    """Load time, time to first token, prefill and decode tokens/s (median, min-max), peak RSS."""
    from .engine import load

    m = load(model, threads=threads)
    r = m.benchmark(prompt_tokens, gen_tokens, runs)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return

    def f(s, scale=1.0, unit=""):
        return f"{s['median'] * scale:.1f}{unit} (min {s['min'] * scale:.1f}, max {s['max'] * scale:.1f})"

    click.echo(f"model      {r['model']} ({r['quant']}, {r['threads']} threads, {r['backend']})\n"
               f"load       {r['load_s']:.2f} s\n"
               f"ttft       {f(r['ttft_s'], 1000, ' ms')} for {r['prompt_tokens']} prompt tokens\n"
               f"prefill    {f(r['prefill_tps'])} tok/s\n"
               f"decode     {f(r['decode_tps'])} tok/s over {r['gen_tokens']} tokens, {r['runs']} runs\n"
               f"peak RSS   {r['peak_rss_mb']:.0f} MB")


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--text", "text_file", required=True, type=click.Path(),
              help="UTF-8 text file to score.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Score at most this many tokens (default: the file's context length).")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def eval_cmd(model, text_file, max_tokens, threads, as_json):
    """Perplexity of a text (BOS prepended, one window of up to the context length)."""
    try:
        with open(text_file, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise GemmaEdgeError(f"{text_file}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise GemmaEdgeError(f"{text_file} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None
    from .engine import load

    m = load(model, threads=threads)
    bar = None
    if not as_json:
        bar = click.progressbar(length=1, label="scoring", file=sys.stderr)

        def progress(done, total):
            bar.length = total
            bar.update(done - bar.pos)
    r = m.perplexity(text, max_tokens=max_tokens, progress=progress if bar else None)
    if bar:
        bar.render_finish()
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        click.echo(f"perplexity {r['perplexity']:.3f} (mean NLL {r['mean_nll']:.4f}) over {r['predicted']} "
                   f"predicted tokens of {r['tokens']} (BOS + text); {r['quant']}; {r['seconds']:.1f} s")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def info(model, as_json):
    """What a gemma-edge file holds: architecture, sizes, quantization, context, tokenizer, template."""
    import os

    from .modelfile import read_info

    i = read_info(model)
    meta = dict(i.meta)
    if as_json:
        click.echo(json.dumps(meta, indent=1))
        return
    c = i.config
    t = i.tokens
    click.echo(
        f"file          {model} ({os.path.getsize(model) / 1e6:.1f} MB)\n"
        f"model         Gemma {c.family}: {c.num_layers} layers, d_model {c.hidden_size}, FFN "
        f"{c.intermediate_size}, {c.num_heads} query / {c.num_kv_heads} KV heads x {c.head_dim}, vocab "
        f"{c.vocab_size} ({c.num_params / 1e6:.0f}M params)\n"
        f"attention     {sum(c.is_sliding(k) for k in range(c.num_layers))} sliding (window "
        f"{c.sliding_window}) / {sum(not c.is_sliding(k) for k in range(c.num_layers))} global layers; "
        f"RoPE {c.rope_local_base:g} / {c.rope_base:g}\n"
        f"quantization  {i.quant} ({meta['quantization']['scheme']['description']})\n"
        f"context       {i.context_length} tokens; prefill chunks {', '.join(map(str, i.prefill_lengths))}\n"
        f"tokenizer     SentencePiece, {len(i.tokenizer_model) / 1e6:.1f} MB; bos {t['bos_id']}, eos "
        f"{t['eos_id']}, stop {t.get('stop_token_ids')}\n"
        f"chat template {meta['chat_template']['kind']}"
        f"{' (+ checkpoint jinja template)' if meta['chat_template'].get('jinja') else ''}\n"
        f"source        {meta['source']['name']} ({meta['source']['format']}, sha256 "
        f"{meta['source']['sha256'][:16]}...)")


from .server import serve  # noqa: E402  (light: numpy loads with the first request)

main.add_command(serve)
from .litertlm import pack_cmd  # noqa: E402  (litert_lm_builder loads only when packing)

main.add_command(pack_cmd)

if __name__ == "__main__":
    main()
