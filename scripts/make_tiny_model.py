"""Writes a tiny random Hugging Face checkpoint and its offline tokenizer (``parallel.arch.tiny``).

    python scripts/make_tiny_model.py --out /tmp/tiny-moe --arch qwen3_moe --experts 4 --topk 2
    python scripts/make_tiny_model.py --out /tmp/tiny-dsv3 --arch deepseek_v3 --experts 8 --topk 4

Prints one JSON line: the folder and the parameter count.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.arch.tiny import TinyModelSpec, make_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    for field, default in asdict(TinyModelSpec()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args())
    out = args.pop("out")
    path = make_tiny_model(out, TinyModelSpec(**args))
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(path / "model.safetensors").values())
    print(json.dumps({"out": str(path), "params": n_params}))


if __name__ == "__main__":
    main()
