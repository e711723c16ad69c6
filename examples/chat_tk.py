"""A small desktop chat window for a gemma-edge model, with Tk from the standard library.

    python examples/chat_tk.py gemma3-270m-int8.tflite [--system "Be brief."] [--max-tokens 256]

Generation runs in a worker thread. The worker never touches Tk: it puts text on a queue,
and the UI thread drains that queue every few milliseconds from ``root.after``, so the
window keeps redrawing and the Stop button keeps working while the model runs. Stop closes
the token stream after the current token; the partial reply stays in the conversation, as
it does for Ctrl-C in ``gemma-edge chat``. Turns share one ``Conversation``, so each turn
prefills only its new tokens.

``ChatApp`` takes an already-loaded model and a Tk root, so a script or a test can drive it
without a person: ``app.send("hi")``, ``app.wait_idle()``, ``app.transcript()``.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
import tkinter as tk
from tkinter import ttk

import gemma_edge
from gemma_edge.runtime.errors import GemmaEdgeError

POLL_MS = 20  # how often the UI thread drains the token queue


class ChatApp:
    def __init__(self, root: tk.Tk, model, system: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0):
        self.root, self.model, self.system = root, model, system
        self.gen_kwargs = dict(max_tokens=max_tokens, temperature=temperature)
        self.conversation = model.chat(system=system)
        self.events: queue.Queue = queue.Queue()  # worker -> UI: ("text" | "error" | "done", value)
        self.stop_requested = threading.Event()
        self.worker: threading.Thread | None = None
        self.busy = False
        self._build()
        self._poll_id = self.root.after(POLL_MS, self._poll)

    # ---- widgets (UI thread) -----------------------------------------------------
    def _build(self) -> None:
        self.root.title(f"gemma-edge chat - {self.model.info.path}")
        self.root.minsize(420, 300)
        frame = ttk.Frame(self.root, padding=6)
        frame.pack(fill="both", expand=True)

        self.text = tk.Text(frame, wrap="word", state="disabled", height=20, width=72)
        scroll = ttk.Scrollbar(frame, command=self.text.yview)
        self.text.configure(yscrollcommand=scroll.set)
        self.text.tag_configure("user", font=("TkDefaultFont", 10, "bold"))
        self.text.tag_configure("info", foreground="gray40")
        self.text.grid(row=0, column=0, columnspan=4, sticky="nsew")
        scroll.grid(row=0, column=4, sticky="ns")

        self.entry = ttk.Entry(frame)
        self.entry.bind("<Return>", lambda _event: self.send())
        self.send_button = ttk.Button(frame, text="Send", command=self.send)
        self.stop_button = ttk.Button(frame, text="Stop", command=self.stop, state="disabled")
        self.new_button = ttk.Button(frame, text="New chat", command=self.new_chat)
        self.entry.grid(row=1, column=0, sticky="ew", pady=(6, 0))
        self.send_button.grid(row=1, column=1, pady=(6, 0))
        self.stop_button.grid(row=1, column=2, pady=(6, 0))
        self.new_button.grid(row=1, column=3, pady=(6, 0))

        info = self.model.info
        self.status = ttk.Label(frame, text=f"Gemma {info.config.family}, {info.quant}, "
                                            f"context {info.context_length} tokens")
        self.status.grid(row=2, column=0, columnspan=5, sticky="w", pady=(4, 0))
        frame.rowconfigure(0, weight=1)
        frame.columnconfigure(0, weight=1)
        self.entry.focus_set()

    def _append(self, text: str, tag: str | None = None) -> None:
        self.text.configure(state="normal")
        self.text.insert("end", text, tag or ())
        self.text.configure(state="disabled")
        self.text.see("end")

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.send_button.configure(state="disabled" if busy else "normal")
        self.new_button.configure(state="disabled" if busy else "normal")
        self.stop_button.configure(state="normal" if busy else "disabled")

    def transcript(self) -> str:
        return self.text.get("1.0", "end-1c")

    # ---- actions (UI thread) -------------------------------------------------------
    def send(self, message: str | None = None) -> bool:
        """Start a reply to ``message`` (default: the entry's text). False if busy or empty."""
        message = (self.entry.get() if message is None else message).strip()
        if self.busy or not message:
            return False
        self.entry.delete(0, "end")
        self._append(f"You: {message}\n", "user")
        self._append("Gemma: ")
        self.stop_requested.clear()
        self._set_busy(True)
        self.status.configure(text="generating...")
        self.worker = threading.Thread(target=self._generate, args=(message,), daemon=True)
        self.worker.start()
        return True

    def stop(self) -> None:
        self.stop_requested.set()  # the worker closes the stream after the current token

    def new_chat(self) -> None:
        if not self.busy:
            self.conversation = self.model.chat(system=self.system)
            self._append("--- new chat ---\n\n", "info")

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Run the Tk event loop until the current reply is finished (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the reply did not finish within {timeout} s")
            self.root.update()
            time.sleep(0.002)

    # ---- the worker thread: never touches Tk -------------------------------------------
    def _generate(self, message: str) -> None:
        stream = self.conversation.send(message, **self.gen_kwargs)
        last, reason = None, "error"
        try:
            for last in stream:
                if last.text:
                    self.events.put(("text", last.text))
                reason = last.finish_reason  # "stop" or "length" on the last token
                if reason is None and self.stop_requested.is_set():
                    reason = "stopped"
                    break
        except GemmaEdgeError as e:  # e.g. the conversation no longer fits the context
            self.events.put(("error", str(e)))
        finally:
            stream.close()  # ends the model's stream; the partial reply joins the conversation
            self.events.put(("done", (reason, last)))

    # ---- the UI thread drains the queue ---------------------------------------------------
    def _poll(self) -> None:
        pieces = []
        try:
            while True:
                kind, value = self.events.get_nowait()
                if kind == "text":
                    pieces.append(value)
                    continue
                self._append("".join(pieces))
                pieces = []
                if kind == "error":
                    self._append(f"\n[{value}]", "info")  # the error says what to do
                elif kind == "done":
                    self._finish(*value)
        except queue.Empty:
            pass
        if pieces:
            self._append("".join(pieces))
        self._poll_id = self.root.after(POLL_MS, self._poll)

    def _finish(self, reason, last) -> None:
        if reason == "stopped":
            self._append(" [stopped]", "info")
        self._append("\n\n")
        if last is None:
            self.status.configure(text=f"no reply ({reason})")
        else:
            self.status.configure(text=f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s, "
                                       f"first token after {last.time_to_first_token:.2f} s ({reason})")
        self._set_busy(False)

    def close(self) -> None:
        self.stop()
        if self.worker is not None:
            self.worker.join(timeout=5)
        self.root.after_cancel(self._poll_id)
        self.root.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description="A Tk chat window for a gemma-edge model.")
    parser.add_argument("model", help="a .tflite written by gemma-convert")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = parser.parse_args()

    model = gemma_edge.load(args.model)
    root = tk.Tk()
    app = ChatApp(root, model, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature)
    root.protocol("WM_DELETE_WINDOW", app.close)
    root.mainloop()


if __name__ == "__main__":
    main()
