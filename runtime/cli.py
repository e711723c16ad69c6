"""``gemma-edge``: run, chat, bench and inspect gemma-edge files. A thin shell over the API."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from .. import __version__
from . import native_log
from .process import exit_code, terminate_as_interrupt
from .errors import GemmaEdgeError


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GemmaEdgeError as e:
            click.echo(f"gemma-edge: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before a command handles it: 130 / 143, no "Aborted!"
            click.echo("", err=True)
            sys.exit(exit_code(e))
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


_DRAFT_HELP = ("Speculative decoding: a smaller gemma-edge file with the same tokenizer (e.g. an int4-b32 "
               "conversion of MODEL, or Gemma 3 270M for Gemma 3 1B) drafts tokens that MODEL checks "
               "several at a time. Greedy output is unchanged; sampled output keeps its distribution. "
               "A draft converted with `gemma-convert --for-draft` drafts faster (its LM head computes "
               "only the frequent pieces and the context's recent tokens). Its context may be shorter "
               "than MODEL's: after a long prompt, or past its own context, it reads the latest 512 "
               "tokens. Not used with --json-schema / --grammar.")


def _draft_option(fn):
    return click.option("--draft", type=click.Path(), default=None, metavar="DRAFT", help=_DRAFT_HELP)(fn)


def _draft_line(m) -> str:
    """What speculative decoding did in the last generation, for -v."""
    s = m.speculator.stats
    if not s.rounds:
        return f"; draft {m.draft.info.path} not used (a constrained request, or drafting did not pay)"
    return (f"; draft {m.draft.info.path} ({m.draft.info.quant}): {s.rounds} rounds, mean k {s.mean_k:.1f}, "
            f"{s.accepted}/{s.drafted} drafted tokens accepted ({s.acceptance_rate:.0%})")


def _constraint_options(fn):
    for opt in reversed([
        click.option("--json-schema", "json_schema_file", type=click.Path(), default=None,
                     help="Generate JSON that follows this JSON Schema file (constrained decoding)."),
        click.option("--grammar", "grammar_file", type=click.Path(), default=None,
                     help="Generate text that follows this grammar file (Lark, or GBNF: root ::= ...)."),
    ]):
        fn = opt(fn)
    return fn


def _constraint_kwargs(kw) -> dict:
    """--json-schema / --grammar files -> stream_generate's json_schema / grammar, checked before the
    model loads (a bad schema fails in milliseconds)."""
    schema_file, grammar_file = kw.pop("json_schema_file"), kw.pop("grammar_file")
    if schema_file and grammar_file:
        raise GemmaEdgeError("give --json-schema or --grammar, not both")
    path = schema_file or grammar_file
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise GemmaEdgeError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise GemmaEdgeError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    from . import constrained

    if schema_file:
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise GemmaEdgeError(f"{path} is not valid JSON ({e}); --json-schema takes a JSON Schema file") from None
        constrained.json_schema_grammar(schema)  # malformed: fails here, before loading the model
        return {"json_schema": schema}
    constrained.lark_grammar(text)
    return {"grammar": text}


def _sampling_kwargs(kw) -> dict:
    from .sampling import validate_sampling

    validate_sampling(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                      min_p=kw["min_p"], repetition_penalty=kw["repeat_penalty"], seed=kw["seed"])
    return dict(max_tokens=kw["max_tokens"], temperature=kw["temperature"], top_k=kw["top_k"],
                top_p=kw["top_p"], min_p=kw["min_p"], repetition_penalty=kw["repeat_penalty"],
                seed=kw["seed"], stop=list(kw["stop"]) or None)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="gemma-edge", message="%(prog)s %(version)s")
def main():
    """Run Gemma models converted by gemma-convert on CPUs, Raspberry Pis and phones.

    \b
    gemma-edge run MODEL -p "Why is the sky blue?"     stream a completion
    gemma-edge run MODEL --chat -p "Hi"               one chat turn (Gemma template)
    gemma-edge chat MODEL                             interactive multi-turn chat
    gemma-edge bench MODEL                            prefill/decode speed, memory
    gemma-edge eval MODEL --text FILE                 perplexity of a text
    gemma-edge info MODEL                             what the file holds
    gemma-edge embed MODEL "some text"                an embedding model's vectors (JSON lines)
    gemma-edge serve MODEL                            OpenAI-compatible HTTP server
    gemma-edge pack MODEL                             .litertlm for LiteRT-LM (Android, iOS)

    Set GEMMA_EDGE_DEBUG=1 to see LiteRT's own log.
    """
    native_log.silence_process()
    terminate_as_interrupt()
    import warnings

    def _note(message, category, filename, lineno, file=None, line=None):
        # one line a user can read (e.g. a chat template refused), not Python's two-line warning
        click.echo(f"gemma-edge: note: {message} ({category.__name__})", err=True)

    warnings.showwarning = _note


@main.command()
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Prompt text; '-' reads it from stdin.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System prompt (implies --chat).")
@click.option("--think", is_flag=True, help="Ask a model that can think (Gemma 4) to think first (implies --chat).")
@click.option("--show-thinking", is_flag=True,
              help="Print the model's thoughts (Gemma 4's thought channel) to stderr; by default they are hidden.")
@click.option("-v", "--verbose", is_flag=True, help="Statistics on stderr.")
@_draft_option
@_sampling_options
@_constraint_options
@_handle_errors
def run(model, prompt, chat, system, think, show_thinking, verbose, draft, **kw):
    """Stream a continuation of PROMPT from MODEL; only generated text goes to stdout.

    With --chat, PROMPT is one user turn in the model's chat format; a model that thinks
    before it answers (Gemma 4) keeps its thoughts apart from the answer (--show-thinking).
    With --json-schema FILE (or --grammar FILE) the output is generated under the schema (or
    grammar): JSON that validates, ending as soon as it is complete."""
    sampling = {**_sampling_kwargs(kw), **_constraint_kwargs(kw)}
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

    m = load(model, threads=kw["threads"], draft=draft)
    chat = chat or system is not None or think
    if chat:
        stream = m.chat(system=system, thinking=think).send(prompt, **sampling)
    else:
        stream = m.stream_generate(prompt, **sampling)
    last, interrupted = None, False
    try:
        for r in stream:
            # a raw continuation is all of the text; a chat answer keeps the thoughts apart
            sys.stdout.write(r.text if chat else r.text + r.reasoning)
            sys.stdout.flush()
            if chat and show_thinking and r.reasoning:
                sys.stderr.write(r.reasoning)
                sys.stderr.flush()
            last = r
    except KeyboardInterrupt as e:  # Ctrl-C ends the answer: the text so far stays, exit 130 says it was cut
        interrupted = exit_code(e)
    sys.stdout.write("\n")
    if verbose and last is not None:
        click.echo(f"[{last.finish_reason}] prompt {last.prompt_tokens} tokens ({last.prompt_tps:.1f} tok/s, "
                   f"first token after {last.time_to_first_token * 1000:.0f} ms), generated "
                   f"{last.generation_tokens} tokens ({last.generation_tps:.1f} tok/s); load "
                   f"{m.load_seconds:.2f} s; backend {m.backend.name}" + (_draft_line(m) if draft else ""), err=True)
    if interrupted:
        sys.stdout.flush()
        sys.exit(interrupted)


@main.command("chat")
@click.argument("model", type=click.Path())
@click.option("--system", default=None, help="System prompt (Gemma 1-3 fold it into the first user turn).")
@click.option("--think", is_flag=True, help="Ask a model that can think (Gemma 4) to think first.")
@click.option("--show-thinking", is_flag=True, help="Print the model's thoughts to stderr; by default hidden.")
@_draft_option
@_sampling_options
@_constraint_options
@_handle_errors
def chat_cmd(model, system, think, show_thinking, draft, **kw):
    """Interactive multi-turn chat. Ctrl-C stops an answer, Ctrl-D exits. With --json-schema or
    --grammar every answer follows the schema or grammar."""
    sampling = {**_sampling_kwargs(kw), **_constraint_kwargs(kw)}
    from .engine import load

    m = load(model, threads=kw["threads"], draft=draft)
    conv = m.chat(system=system, thinking=think)
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
                if show_thinking and r.reasoning:
                    sys.stderr.write(r.reasoning)
                    sys.stderr.flush()
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
@_draft_option
@_handle_errors
def bench(model, prompt_tokens, gen_tokens, runs, threads, as_json, draft):
    """Load time, time to first token, prefill and decode tokens/s (median, min-max), peak RSS.
    With --draft, decoding is speculative (greedy) and the draft's acceptance rate is reported;
    benchmarks/speculative.py compares it with decoding alone in one run."""
    from .engine import load

    m = load(model, threads=threads, draft=draft)
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
               f"peak RSS   {r['peak_rss_mb']:.0f} MiB ({r['rss_over_file']:.2f}x the file)")
    if draft:
        d = r["draft"]
        click.echo(f"draft      {d['model']} ({d['quant']}): mean k {d['mean_k']:.1f}, {d['accepted']}/{d['drafted']} "
                   f"drafted tokens accepted ({d['acceptance_rate']:.0%}), {d['plain']} tokens decoded alone")


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--text", "text_file", required=True, type=click.Path(),
              help="UTF-8 text file to score.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Score at most this many tokens (default: the file's context length).")
@click.option("--base", type=click.Path(), default=None,
              help="A reference file of the same model (e.g. its fp32 conversion): also report the KL divergence "
                   "of MODEL's token distributions from BASE's (mean, 99th percentile), top-1 agreement and the "
                   "perplexity ratio, on identical tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def eval_cmd(model, text_file, max_tokens, base, threads, as_json):
    """Perplexity of a text (BOS prepended, one window of up to the context length); with --base,
    how far MODEL's predictions are from BASE's (what llama.cpp's --kl-divergence reports)."""
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
    if base is not None:
        r = m.compare(load(base, threads=threads), text, max_tokens=max_tokens, progress=progress if bar else None)
    else:
        r = m.perplexity(text, max_tokens=max_tokens, progress=progress if bar else None)
    if bar:
        bar.render_finish()
    if as_json:
        click.echo(json.dumps(r, indent=1))
    elif base is not None:
        from ..quantize.report import format_comparison

        click.echo(format_comparison(r))
    else:
        click.echo(f"perplexity {r['perplexity']:.3f} (mean NLL {r['mean_nll']:.4f}) over {r['predicted']} "
                   f"predicted tokens of {r['tokens']} (BOS + text); {r['quant']}; {r['seconds']:.1f} s")


def _read_lines(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 file ('-': stdin), without their line ends."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        text = data.decode("utf-8")
    except OSError as e:
        raise GemmaEdgeError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise GemmaEdgeError(f"{'stdin' if path == '-' else path} is not valid UTF-8 (byte {e.start}); convert it to "
                             "UTF-8 first") from None
    return [line for line in text.splitlines() if line.strip()]


@main.command("embed")
@click.argument("model", type=click.Path())
@click.argument("texts", nargs=-1)
@click.option("-f", "--file", "text_file", type=click.Path(), default=None,
              help="Embed each non-empty line of this UTF-8 file ('-': stdin), after any TEXTS.")
@click.option("--task", default=None,
              help="The task prompt put before each text, by name (EmbeddingGemma: query, document, Clustering, "
                   "...; `gemma-edge info MODEL` lists them). Default: the model's own default (none for EmbeddingGemma).")
@click.option("--dim", type=click.IntRange(min=1), default=None,
              help="Keep the first DIM values of each vector and normalise again (Matryoshka; EmbeddingGemma: 512, "
                   "256 or 128). Default: the full size.")
@click.option("--truncate", is_flag=True,
              help="Cut a text longer than the file's context to its first tokens instead of refusing it.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: cores, up to 4).")
@_handle_errors
def embed_cmd(model, texts, text_file, task, dim, truncate, threads):
    """Print the vectors of TEXTS (and of each line of --file) from an embedding MODEL
    (EmbeddingGemma), one JSON line per text, in order: {"index", "tokens", "embedding"}.

    \b
    gemma-edge embed embeddinggemma-int8.tflite "Which planet is red?" --task query
    gemma-edge embed embeddinggemma-int8.tflite -f passages.txt --task document --dim 256
    """
    texts = list(texts) + (_read_lines(text_file) if text_file else [])
    if not texts:
        raise GemmaEdgeError("nothing to embed: give texts as arguments or a file with -f FILE (one text a line)")
    from .engine import load

    m = load(model, threads=threads)
    ids = [m.embedding_ids(t, task=task, truncate=truncate) for t in texts]
    vectors = m.embed_ids(ids, dim=dim)
    for i, (tokens, v) in enumerate(zip(ids, vectors)):
        sys.stdout.write(json.dumps({"index": i, "tokens": len(tokens),
                                     "embedding": [float(f"{x:.9g}") for x in v.tolist()]}) + "\n")
    sys.stdout.flush()


@main.command()
@click.argument("model", type=click.Path())
@click.option("--verify", is_flag=True,
              help="Also read every weight byte and check it against the file's checksum (a load checks "
                   "the graph, metadata and tokenizer; the weights are checked here, and when a file is "
                   "first packed for XNNPACK on this machine).")
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def info(model, verify, as_json):
    """What a gemma-edge file holds: architecture, sizes, quantization, context, tokenizer, template."""
    from . import contract
    from .modelfile import read_info, verify_weights

    i = read_info(model)
    verified = None
    if verify:
        verified = verify_weights(i)
    m = i.meta
    if as_json:
        click.echo(json.dumps({**m.to_dict(), **({"weights_verified": verified} if verify else {})}, indent=1))
        return
    c, t = i.config, m.tokenizer
    sliding = sum(c.is_sliding(k) for k in range(c.num_layers))
    lines = [
        f"file          {model} ({os.path.getsize(model) / 1e6:.1f} MB, format {m.format_version})",
        f"model         Gemma {c.family}: {c.num_layers} layers, d_model {c.hidden_size}, FFN "
        f"{c.intermediate_size}, {c.num_heads} query / {c.num_kv_heads} KV heads x {c.head_dim}, vocab "
        f"{c.vocab_size} ({c.num_params / 1e6:.0f}M params)",
        f"attention     {sliding} sliding (window {c.sliding_window}) / {c.num_layers - sliding} global layers; "
        f"RoPE {c.rope_local_base:g} / {c.rope_base:g}"
        + (f" (global: {c.global_rope_fraction:g} of the pairs rotate)" if c.global_rope_fraction < 1 else "")
        + (f"; sliding caches are rings of {contract.ring_slots(c)} slots" if c.kv_ring else ""),
    ]
    if c.family >= 4:
        g = next((k for k in range(c.num_layers) if not c.is_sliding(k)), 0)
        lines.append(
            f"gemma 4       global layers {c.kv_heads_for(g)} KV heads x {c.head_dim_for(g)}; last "
            f"{c.kv_shared_layers} layers share earlier caches ({len(contract.kv_layers(c))} caches); per-layer "
            f"embeddings {c.ple_dim} x {c.num_layers} layers ({c.ple_vocab} rows)"
            + ("; double-wide FFN on sharing layers" if c.double_wide_mlp else "")
            + ("; K = V on global layers" if c.k_eq_v else ""))
    e = m.embedding
    if e is not None:
        dense = " -> ".join(map(str, (c.hidden_size, *c.dense_dims)))
        lines += [
            f"embedding     {'bidirectional' if c.bidirectional else 'causal'} attention, mean pooling, Dense "
            f"{dense if c.dense_dims else 'none'}, {'normalised ' if e.normalize else ''}vectors of {e.dim}"
            + (f" (Matryoshka: {', '.join(map(str, e.matryoshka_dims))})" if e.matryoshka_dims else ""),
            f"tasks         {', '.join(sorted(e.prompts)) or 'none'}"
            + (f"; default {e.default_task}" if e.default_task else ""),
        ]
    chunks = (f"embed chunks {', '.join(map(str, i.embed_lengths))}" if e is not None else
              f"prefill chunks {', '.join(map(str, i.prefill_lengths))}; score chunks "
              f"{', '.join(map(str, i.score_lengths)) or 'none (eval scores token by token; no draft can speed it up)'}"
              + (f"; decode_hot over {c.embed_hot_rows} frequent pieces (a draft"
                 + (", with " + ", ".join(f"decode_hot_s{s}" for s in i.decode_hot_spans) if i.decode_hot_spans else "")
                 + ")" if i.decode_hot else ""))
    lines += [
        f"quantization  {m.quantization.name} ({m.quantization.description})",
        f"context       {i.context_length} tokens; {chunks}",
        f"tokenizer     SentencePiece, {len(i.tokenizer_model) / 1e6:.1f} MB; bos {t.bos_id}, eos "
        f"{t.eos_id}, stop {list(t.stop_token_ids)}",
        f"chat template {m.chat_template.kind}{' (+ checkpoint jinja template)' if m.chat_template.jinja else ''}",
        f"source        {m.source.name} ({m.source.format}, sha256 {m.source.sha256[:16]}...)"
        + (f"; LoRA {m.source.lora.get('name')}" if m.source.lora else ""),
    ]
    if verify:
        lines.append("verified      " + ("every weight byte matches the file's checksum" if verified else
                                         "not possible: the file predates weight checksums (format 1)"))
    click.echo("\n".join(lines))


@main.command("serve")
@click.argument("model", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 0.0.0.0 (or ::) accepts other machines: then set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port; 0 picks a free one. The URL is printed on stdout.")
@click.option("--api-key", envvar="GEMMA_EDGE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (also read from "
                   "GEMMA_EDGE_API_KEY, which keeps it out of the process list).")
@click.option("--max-queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests that may wait while one generates; one more is answered 503 with Retry-After.")
@click.option("--model-name", default=None,
              help="The model id clients send and /v1/models lists (default: the file name without .tflite).")
@click.option("--strict-model", is_flag=True,
              help="Answer 404 to requests naming another model (by default any name is served, as "
                   "llama-server does: many clients send a fixed name).")
@click.option("--max-body", type=click.IntRange(min=1024), default=8 << 20, show_default=True,
              help="Largest request body in bytes; a larger one is answered 413 before it is read.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: cores, up to 4).")
@_draft_option
@click.option("-q", "--quiet", is_flag=True, help="No log line per request on stderr.")
def serve(model, host, port, api_key, max_queue, model_name, strict_model, max_body, threads, draft, quiet):
    """Serve MODEL over an OpenAI-compatible HTTP API on this machine.

    \b
    POST /v1/chat/completions   chat (the Gemma template), streamed or not
    POST /v1/completions        raw text continuation
    POST /v1/embeddings         an embedding model's vectors (EmbeddingGemma)
    GET  /v1/models, /health
    \b
    gemma-edge serve model.tflite
    gemma-edge serve model.tflite --port 0 --api-key secret
    \b
    Then, in Python:
      openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="secret")
    or: curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}'

    Structured output (response_format json_schema / json_object, or a "grammar") and tool
    calls (tools, tool_choice, role "tool" messages) are generated under a grammar, so the JSON
    always parses; a schema or tool that cannot be compiled is a 400.

    One request generates at a time; up to --max-queue more wait their turn, in order.
    Ctrl-C stops the server.
    """
    def err(line: str) -> None:
        click.echo(line, err=True)

    try:
        from .engine import load
        from .server import make_server

        m = load(model, threads=threads, draft=draft)
        server = make_server(m, host, port, api_key=api_key, max_queue=max_queue, model_name=model_name,
                             log=None if quiet else err, strict_model=strict_model, max_body=max_body)
    except GemmaEdgeError as e:
        err(f"gemma-edge: error: {e}")
        sys.exit(2)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err(f"gemma-edge serve: warning: listening on {host} without --api-key; anyone who can reach "
            "this machine can use the model")
    err(f"gemma-edge serve: model {server.model_name!r} ({m.info.quant}, context {m.context_length} tokens, "
        f"backend {m.backend.name}{f'; draft {draft} ({m.draft.info.quant})' if draft else ''}), up to {max_queue} "
        "waiting requests; Ctrl-C stops")
    click.echo(server.url)  # on stdout alone, for scripts (--port 0)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err("gemma-edge serve: stopped")
    finally:
        server.server_close()


@main.command("pack")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output .litertlm path (default: MODEL with the suffix .litertlm).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Default sampler stored in the file: top-k (1 = greedy).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Default sampler: nucleus probability.")
@click.option("--temperature", type=click.FloatRange(0.0, min_open=True), default=1.0, show_default=True,
              help="Default sampler: temperature.")
@_handle_errors
def pack_cmd(model, output, force, top_k, top_p, temperature):
    """Pack a gemma-edge MODEL.tflite into a LiteRT-LM .litertlm file.

    The .litertlm holds the model unchanged, its SentencePiece tokenizer and LiteRT-LM's
    metadata (start and stop tokens, context length, Gemma chat template, a greedy default
    sampler), so LiteRT-LM runs it on Android, iOS, desktop and Raspberry Pi CPUs. Needs
    litert-lm-builder (pip install litert-lm-builder). The file is written to a temporary
    name and renamed when complete.

    \b
    Example:
      gemma-edge pack gemma3-270m-int8.tflite
      litert-lm run gemma3-270m-int8.litertlm --prompt "Why is the sky blue?"
    """
    from .litertlm import pack

    out = pack(model, output, force=force, top_k=top_k, top_p=top_p, temperature=temperature)
    click.echo(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)", err=True)


if __name__ == "__main__":
    main()
