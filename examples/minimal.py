"""The smallest embedding of gemma-edge: load a model file, stream a completion to stdout.

    python examples/minimal.py gemma3-270m-int8.tflite -p "The capital of France is"
"""

import argparse

import gemma_edge

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="a .tflite written by gemma-convert")
parser.add_argument("-p", "--prompt", default="The capital of France is")
parser.add_argument("-n", "--max-tokens", type=int, default=64)
parser.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (the default)")
args = parser.parse_args()

model = gemma_edge.load(args.model)  # memory-mapped; tokenizer and config come from the file
for response in model.stream_generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature):
    print(response.text, end="", flush=True)  # one piece of text per token, as it is generated
print()
