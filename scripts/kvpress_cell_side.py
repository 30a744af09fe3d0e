"""kvpress's side of scripts/kvpress_cell.py; runs in the kvpress venv (transformers < 5.3).

    python kvpress_cell_side.py MODEL_DIR IN_JSON OUT_JSON

IN_JSON: {"ratio", "presses": [names], "samples": [{"id", "context_ids", "question_ids",
"max_new"}]}. For each sample and press, kvpress's own pipeline step (`_forward`: the press
active during the context's prefill, then the question and a greedy answer with the true
positions) on the model in float32 (ObservedAttention: eager attention, the others SDPA); the
presses are tests/unit/attention/kvpress_side.py's (kvpress defaults), the kept positions
recovered as it does. Writes {"kvpress", "transformers", "samples": {id: {press: {"answer",
"kept"}}}}.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from kvpress.pipeline import KVPressTextGenerationPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/unit/attention"))
from kvpress_side import kept_positions, prefill, presses  # noqa: E402


def main(model_dir: str, inp: str, out: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(inp).read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    result = {"kvpress": version("kvpress"), "transformers": version("transformers"), "samples": {}}
    models = {}
    for name in job["presses"]:
        impl = "eager" if name == "observed_attention" else "sdpa"  # as kvpress_side.py
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation=impl).eval()
        model = models[impl]
        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
        for s in job["samples"]:
            ctx, question = torch.tensor([s["context_ids"]]), torch.tensor([s["question_ids"]])
            press = presses(job["ratio"])[name]
            if name in ("adakv", "critical_adakv"):
                press.compression_ratio = job["ratio"]
            # the reference before the press: a full-length pass clears the masks AdaKV leaves
            # (kvpress's attention patch), which kept_positions reads
            full = prefill(model.model, ctx)
            for layer in model.model.layers:
                layer.self_attn.masked_key_indices = None
            cache = DynamicCache()
            with torch.no_grad():
                answer = pipe._forward({"context_ids": ctx, "questions_ids": [question]},
                                       max_new_tokens=s["max_new"], press=press, cache=cache)[0]
            kept = kept_positions(full, cache, model)
            result["samples"].setdefault(s["id"], {})[name] = {"answer": answer, "kept": kept}
            print(s["id"], name, repr(answer), flush=True)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
